"""Reduce the step size when the loss stops improving."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._hyperparams import (
    CLOSED_UNIT_INTERVAL,
    NONNEGATIVE,
    Domain,
    _is_schedule,
    as_hyperparameter,
)
from ._dtypes import tree_dtype

OPEN_UNIT_INTERVAL = Domain(
    low=0.0, high=1.0, low_open=True, high_open=True, text="in (0, 1)"
)


def _number(name: str, domain: Domain) -> Any:
    """A float hyperparameter field that takes numbers only, not schedules."""

    def convert(value: Any) -> Array:
        if _is_schedule(value):
            raise TypeError(
                f"reduce_on_plateau's {name} must be a number, not a schedule: "
                "its state counts accumulated losses, not steps"
            )
        return as_hyperparameter(value, name=name, domain=domain)

    return eqx.field(converter=convert, metadata={"hyperparameter": {"domain": domain}})


def _integer(name: str, minimum: int) -> Any:
    """An int32 array field (changing it never recompiles), at least ``minimum``."""

    def convert(value: ArrayLike) -> Array:
        if isinstance(value, jax.core.Tracer):
            return value
        try:
            integral = int(value) == value and not isinstance(value, bool)
        except (TypeError, ValueError):
            integral = False
        if not integral:
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        return jnp.asarray(int(value), jnp.int32)

    return eqx.field(converter=convert)


class ReduceLROnPlateauState(eqx.Module):
    """The scale applied to the updates, and what decides when to lower it.

    ``count`` and ``avg_value`` accumulate the losses of the current window;
    ``best_value`` is the best window average yet, ``plateau_count`` the windows
    since it improved, ``cooldown_count`` the windows left before counting again.
    """

    count: Array
    scale: Array
    best_value: Array
    plateau_count: Array
    cooldown_count: Array
    avg_value: Array


class ReduceOnPlateau(AbstractTransform):
    """Multiply the updates by a scale that drops by ``factor`` on each plateau.

    The losses passed as ``value`` are averaged over windows of
    ``accumulation_size`` steps. A window improves when its average ``a`` is
    below ``(1 - rtol) * best - atol``; after ``patience`` windows without
    improvement, ``scale <- max(scale * factor, min_scale)`` and the next
    ``cooldown`` windows are not counted. Chain it after the optimizer: it
    scales the final updates.
    """

    factor: Array = _number("factor", OPEN_UNIT_INTERVAL)
    patience: Array = _integer("patience", 1)
    rtol: Array = _number("rtol", CLOSED_UNIT_INTERVAL)
    atol: Array = _number("atol", NONNEGATIVE)
    cooldown: Array = _integer("cooldown", 0)
    accumulation_size: Array = _integer("accumulation_size", 1)
    min_scale: Array = _number("min_scale", NONNEGATIVE)
    takes_extra_args = True

    def init(self, params: Params) -> ReduceLROnPlateauState:
        # optax's choice: the scale in the parameters' lowest dtype (so it never
        # promotes an update), the losses in their highest.
        low, high = tree_dtype(params, "lowest"), tree_dtype(params, "highest")
        return ReduceLROnPlateauState(
            count=zero_count(),
            scale=jnp.ones([], low),
            best_value=jnp.full([], jnp.inf, high),
            plateau_count=jnp.zeros([], jnp.int32),
            cooldown_count=jnp.zeros([], jnp.int32),
            avg_value=jnp.zeros([], high),
        )

    def update(
        self,
        grads: Updates,
        state: ReduceLROnPlateauState,
        params: Params | None = None,
        *,
        value: ArrayLike | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, ReduceLROnPlateauState]:
        del params, extra_args
        if value is None:
            raise TypeError(
                "reduce_on_plateau needs the loss of the step: pass it as value=, "
                "e.g. opt.step(params, grads, value=loss)"
            )
        avg = state.avg_value
        count = safe_increment(state.count)
        value = jnp.asarray(value).astype(avg.dtype)
        avg = (state.count.astype(avg.dtype) * avg + value) / count.astype(avg.dtype)
        accumulated = eqx.tree_at(lambda s: (s.count, s.avg_value), state, (count, avg))
        judged = self._judge(accumulated)
        state = jax.tree.map(
            lambda j, a: jnp.where(count == self.accumulation_size, j, a),
            judged,
            accumulated,
        )
        scale = state.scale
        updates = jax.tree.map(lambda g: scale.astype(g.dtype) * g, grads)
        return updates, state

    def _judge(self, state: ReduceLROnPlateauState) -> ReduceLROnPlateauState:
        """The state after a full window: best value, plateau, cooldown, scale."""
        best = state.best_value
        rtol, atol = self.rtol.astype(best.dtype), self.atol.astype(best.dtype)
        improved = state.avg_value < (1 - rtol) * best - atol
        best = jnp.where(improved, state.avg_value.astype(best.dtype), best)
        plateau = jnp.where(improved, 0, safe_increment(state.plateau_count))
        cooling = state.cooldown_count > 0
        reduce = (plateau == self.patience) & ~cooling
        scale = state.scale
        lowered = jnp.where(reduce, scale * self.factor.astype(scale.dtype), scale)
        lowered = jnp.maximum(lowered, self.min_scale.astype(scale.dtype))
        return ReduceLROnPlateauState(
            count=jnp.zeros_like(state.count),
            scale=jnp.where(cooling, scale, lowered),
            best_value=best,
            plateau_count=jnp.where(cooling | reduce, 0, plateau).astype(jnp.int32),
            cooldown_count=jnp.where(
                cooling,
                state.cooldown_count - 1,
                jnp.where(reduce, self.cooldown, 0),
            ).astype(jnp.int32),
            avg_value=jnp.zeros_like(state.avg_value),
        )


def reduce_on_plateau(
    factor: float = 0.1,
    patience: int = 10,
    rtol: float = 1e-4,
    atol: float = 0.0,
    cooldown: int = 0,
    accumulation_size: int = 1,
    min_scale: float = 0.0,
) -> ReduceOnPlateau:
    """Scale the updates down by ``factor`` when the loss (``value=``) plateaus.

    The losses are averaged over windows of ``accumulation_size`` steps; when
    ``patience`` windows in a row fail to beat ``(1 - rtol) * best - atol``, the
    scale becomes ``max(scale * factor, min_scale)``, and the next ``cooldown``
    windows are ignored. Pass the loss with ``opt.step(params, grads,
    value=loss)``.

    No paper: the rule of the ``ReduceLROnPlateau`` callbacks of Keras and
    PyTorch, as optax.contrib has it.
    """
    traced = any(isinstance(x, jax.core.Tracer) for x in (rtol, atol))
    if not traced and float(rtol) == 0.0 and float(atol) == 0.0:
        raise ValueError(
            "at least one of rtol and atol must be > 0, got rtol=0.0 and atol=0.0"
        )
    return ReduceOnPlateau(
        factor, patience, rtol, atol, cooldown, accumulation_size, min_scale
    )
