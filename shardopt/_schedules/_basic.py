"""Learning-rate (and any hyperparameter) schedules, as Modules.

Each matches the optax schedule of the same name number for number. Values and
step counts are array leaves, so changing them never recompiles.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .._hyperparams import NONNEGATIVE, AbstractSchedule, Schedule, hyperparameter


def _steps(value: int, name: str, *, positive: bool = False) -> Array:
    if int(value) != value:
        raise ValueError(f"{name} must be an integer number of steps, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return jnp.asarray(value, jnp.int32)


class Constant(AbstractSchedule):
    """The same value at every step."""

    value: Array = hyperparameter("value")

    def __call__(self, count: ArrayLike) -> Array:
        del count
        return self.value


class Polynomial(AbstractSchedule):
    """``(init - end) * (1 - t / steps) ** power + end``, ``t`` clipped to [0, steps].

    ``t`` counts from ``transition_begin``.
    """

    init_value: Array = hyperparameter("init_value")
    end_value: Array = hyperparameter("end_value")
    power: float = eqx.field(static=True)
    transition_steps: Array = eqx.field(
        converter=lambda v: _steps(v, "steps", positive=True)
    )
    transition_begin: Array = eqx.field(converter=lambda v: _steps(max(v, 0), "begin"))

    def __call__(self, count: ArrayLike) -> Array:
        count = jnp.clip(count - self.transition_begin, 0, self.transition_steps)
        frac = 1 - count / self.transition_steps
        frac = frac.astype(jnp.float32)
        return (self.init_value - self.end_value) * frac**self.power + self.end_value


class PiecewiseConstant(AbstractSchedule):
    """``init_value`` multiplied by each scale once the count reaches its boundary."""

    init_value: Array = hyperparameter("init_value")
    boundaries: tuple[Array, ...]
    scales: tuple[Array, ...]

    def __call__(self, count: ArrayLike) -> Array:
        value = self.init_value
        for boundary, scale in zip(self.boundaries, self.scales, strict=True):
            indicator = (boundary > count).astype(jnp.float32)
            value = value * indicator + (1 - indicator) * scale * value
        return value


class ExponentialDecay(AbstractSchedule):
    """``init * rate ** ((t - begin) / steps)``, optionally stepwise and bounded."""

    init_value: Array = hyperparameter("init_value")
    transition_steps: Array
    decay_rate: Array = hyperparameter("decay_rate", NONNEGATIVE)
    transition_begin: Array
    staircase: bool = eqx.field(static=True)
    end_value: Array | None

    def __call__(self, count: ArrayLike) -> Array:
        decreased = count - self.transition_begin
        p = (decreased / self.transition_steps).astype(jnp.float32)
        if self.staircase:
            p = jnp.floor(p)
        value = jnp.where(
            decreased <= 0,
            self.init_value,
            self.init_value * jnp.power(self.decay_rate, p),
        )
        if self.end_value is not None:
            value = jnp.where(
                self.decay_rate < 1.0,
                jnp.maximum(value, self.end_value),
                jnp.minimum(value, self.end_value),
            )
        return value


class CosineDecay(AbstractSchedule):
    """``init * ((1 - alpha) * (0.5 * (1 + cos(pi * t / steps))) ** exponent + alpha)``.

    Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts",
    ICLR 2017.
    """

    init_value: Array = hyperparameter("init_value")
    decay_steps: Array = eqx.field(
        converter=lambda v: _steps(v, "decay_steps", positive=True).astype(jnp.float32)
    )
    alpha: Array = hyperparameter("alpha")
    exponent: Array = hyperparameter("exponent")

    def __call__(self, count: ArrayLike) -> Array:
        count = jnp.minimum(jnp.asarray(count).astype(jnp.float32), self.decay_steps)
        cosine = 0.5 * (1 + jnp.cos(jnp.pi * count / self.decay_steps))
        return self.init_value * ((1 - self.alpha) * cosine**self.exponent + self.alpha)


class Join(AbstractSchedule):
    """Run each schedule from its boundary on, counting from that boundary."""

    schedules: tuple[Schedule, ...]
    boundaries: tuple[Array, ...]

    def __call__(self, count: ArrayLike) -> Array:
        out = self.schedules[0](count)
        for boundary, schedule in zip(self.boundaries, self.schedules[1:], strict=True):
            out = jnp.where(count < boundary, out, schedule(count - boundary))
        return out


def constant_schedule(value: float) -> Constant:
    """A schedule that always returns ``value``."""
    return Constant(value)


def polynomial_schedule(
    init_value: float,
    end_value: float,
    power: float,
    transition_steps: int,
    transition_begin: int = 0,
) -> AbstractSchedule:
    """Polynomial decay from ``init_value`` to ``end_value`` over ``transition_steps``.

    A non-positive ``transition_steps`` gives the constant ``init_value`` (as optax).
    """
    if transition_steps <= 0:
        return Constant(init_value)
    if int(power) == power:
        power = int(power)  # x ** int is exact (as in optax's linear schedule)
    return Polynomial(init_value, end_value, power, transition_steps, transition_begin)


def linear_schedule(
    init_value: float,
    end_value: float,
    transition_steps: int,
    transition_begin: int = 0,
) -> AbstractSchedule:
    """Linear interpolation from ``init_value`` to ``end_value``."""
    return polynomial_schedule(
        init_value, end_value, 1, transition_steps, transition_begin
    )


def piecewise_constant_schedule(
    init_value: float, boundaries_and_scales: dict[int, float] | None = None
) -> PiecewiseConstant:
    """``init_value`` scaled by ``scale`` from each ``boundary`` on (compounding)."""
    items = sorted((boundaries_and_scales or {}).items())
    for boundary, scale in items:
        if scale < 0:
            raise ValueError(
                f"boundaries_and_scales[{boundary}] = {scale}: scales must be >= 0"
            )
    return PiecewiseConstant(
        init_value,
        tuple(_steps(b, f"boundary {b}") for b, _ in items),
        tuple(jnp.asarray(s, jnp.float32) for _, s in items),
    )


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> AbstractSchedule:
    """``init_value * decay_rate ** ((count - transition_begin) / transition_steps)``.

    A non-positive ``transition_steps`` or a zero ``decay_rate`` gives the constant
    ``init_value`` (as optax); ``end_value`` bounds the decay.
    """
    if transition_steps <= 0 or decay_rate == 0:
        return Constant(init_value)
    return ExponentialDecay(
        init_value,
        _steps(transition_steps, "transition_steps", positive=True),
        decay_rate,
        _steps(max(transition_begin, 0), "transition_begin"),
        staircase,
        None if end_value is None else jnp.asarray(end_value, jnp.float32),
    )


def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0
) -> CosineDecay:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` in ``decay_steps``."""
    return CosineDecay(init_value, decay_steps, alpha, exponent)


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Join:
    """Switch to ``schedules[i + 1]`` at ``boundaries[i]``; each restarts its count."""
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join_schedules needs one boundary fewer than schedules: got "
            f"{len(schedules)} schedules and {len(boundaries)} boundaries"
        )
    for earlier, later in itertools.pairwise(boundaries):
        if later <= earlier:
            raise ValueError(
                f"join_schedules' boundaries must increase, got {list(boundaries)} "
                f"({later} after {earlier})"
            )
    return Join(tuple(schedules), tuple(_steps(b, f"boundary {b}") for b in boundaries))


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Join:
    """Linear warmup to ``peak_value``, then cosine decay to ``end_value``.

    ``decay_steps`` counts the warmup too, as in optax.
    """
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, warmup_steps),
            cosine_decay_schedule(
                peak_value, decay_steps - warmup_steps, alpha, exponent
            ),
        ],
        [warmup_steps],
    )
