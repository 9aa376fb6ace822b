"""The one-cycle policy: warm up to a peak, come back down, then anneal below."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .._hyperparams import POSITIVE, AbstractSchedule, hyperparameter
from ._args import fraction, step_count
from ._interpolate import interpolate

# How each boundary's multiplicative scale follows from the two division factors.
_FACTORS = {
    "div": lambda div, final: div,
    "1/div": lambda div, final: 1 / div,
    "1/final": lambda div, final: 1 / final,
    "1/(div*final)": lambda div, final: 1 / (div * final),
}


class OneCycle(AbstractSchedule):
    """Start at ``peak_value / div_factor``, reach the peak, then anneal.

    The values at the boundaries are the running products of ``peak_value /
    div_factor`` with the factors named in ``factors`` (read from the two
    division factors), interpolated linearly or along a cosine as in
    :func:`~shardopt.piecewise_interpolate_schedule`. ``peak_value`` and the
    division factors are leaves; a schedule rebuilt with another
    ``transition_steps`` or ``pct_start`` has the same structure, so neither
    recompiles.
    """

    interpolate_type: str = eqx.field(static=True)
    peak_value: Array = hyperparameter("peak_value")
    div_factor: Array = hyperparameter("div_factor", POSITIVE)
    final_div_factor: Array = hyperparameter("final_div_factor", POSITIVE)
    boundaries: tuple[Array, ...]
    factors: tuple[str, ...] = eqx.field(static=True)

    def __call__(self, count: ArrayLike) -> Array:
        div, final = self.div_factor, self.final_div_factor
        scales = tuple(_FACTORS[name](div, final) for name in self.factors)
        values = jnp.cumprod(jnp.stack((self.peak_value / div, *scales)))
        return interpolate(self.interpolate_type, self.boundaries, values, count)


def _one_cycle(
    interpolate_type: str,
    peak_value: float,
    div_factor: float,
    final_div_factor: float,
    factor_at: dict[int, str],
) -> OneCycle:
    # A dict, as in optax: two phases that end on the same step keep the later
    # phase's factor at that step.
    items = sorted(factor_at.items())
    return OneCycle(
        interpolate_type,
        peak_value,
        div_factor,
        final_div_factor,
        tuple(step_count(step, f"the boundary {step}") for step, _ in items),
        tuple(name for _, name in items),
    )


def linear_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    pct_final: float = 0.85,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> OneCycle:
    """Three linear phases: up to the peak, back to the start, down to the floor.

    With ``T = transition_steps`` and ``v_0 = peak_value / div_factor``: linear
    from ``v_0`` to ``peak_value`` over ``[0, int(pct_start T))``, back to ``v_0``
    by ``int(pct_final T)``, then to ``v_0 / final_div_factor`` by ``T``, where it
    stays.

    Smith & Topin, "Super-Convergence: Very Fast Training of Neural Networks
    Using Large Learning Rates", arXiv:1708.07120, 2017.
    """
    steps = int(step_count(transition_steps, "transition_steps", minimum=1))
    pct_start = fraction(pct_start, "pct_start")
    pct_final = fraction(pct_final, "pct_final")
    if pct_start > pct_final:
        raise ValueError(
            f"pct_start must be <= pct_final, got pct_start={pct_start!r} and "
            f"pct_final={pct_final!r}"
        )
    return _one_cycle(
        "linear",
        peak_value,
        div_factor,
        final_div_factor,
        {
            int(pct_start * steps): "div",
            int(pct_final * steps): "1/div",
            steps: "1/final",
        },
    )


def cosine_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> OneCycle:
    """Two cosine phases: up to the peak, then down to the floor.

    With ``T = transition_steps`` and ``v_0 = peak_value / div_factor``: along half
    a cosine from ``v_0`` to ``peak_value`` over ``[0, int(pct_start T))``, then to
    ``v_0 / final_div_factor`` by ``T``, where it stays.

    Smith & Topin, "Super-Convergence: Very Fast Training of Neural Networks
    Using Large Learning Rates", arXiv:1708.07120, 2017.
    """
    steps = int(step_count(transition_steps, "transition_steps", minimum=1))
    pct_start = fraction(pct_start, "pct_start")
    return _one_cycle(
        "cosine",
        peak_value,
        div_factor,
        final_div_factor,
        {int(pct_start * steps): "div", steps: "1/(div*final)"},
    )
