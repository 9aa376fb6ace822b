"""A linear warmup to a peak, then a constant or an exponential decay."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .._hyperparams import (
    POSITIVE,
    AbstractSchedule,
    as_hyperparameter,
    hyperparameter,
)
from ._args import step_count


def _warmup(init_value: Array, peak_value: Array, steps: Array, count: Array) -> Array:
    """Linear from ``init_value`` at 0 to ``peak_value`` at ``steps`` (kept after)."""
    steps = jnp.maximum(steps, 1)  # a zero-step warmup is never read (see callers)
    frac = 1 - jnp.clip(count, 0, steps) / steps
    return (init_value - peak_value) * frac.astype(jnp.float32) + peak_value


class WarmupConstant(AbstractSchedule):
    """Linear from ``init_value`` to ``peak_value`` over ``warmup_steps``, then flat."""

    init_value: Array = hyperparameter("init_value")
    peak_value: Array = hyperparameter("peak_value")
    warmup_steps: Array

    def __call__(self, count: ArrayLike) -> Array:
        count = jnp.asarray(count)
        return _warmup(self.init_value, self.peak_value, self.warmup_steps, count)


class WarmupExponentialDecay(AbstractSchedule):
    """A linear warmup to ``peak_value``, then ``peak_value * decay_rate ** p``.

    ``p = (t - warmup_steps - transition_begin) / transition_steps`` (floored
    when ``staircase``); the decay is bounded by ``end_value`` when given (below
    if ``decay_rate < 1``, above otherwise).
    """

    init_value: Array = hyperparameter("init_value")
    peak_value: Array = hyperparameter("peak_value")
    warmup_steps: Array
    transition_steps: Array
    decay_rate: Array = hyperparameter("decay_rate", POSITIVE)
    transition_begin: Array
    staircase: bool = eqx.field(static=True)
    end_value: Array | None

    def __call__(self, count: ArrayLike) -> Array:
        count = jnp.asarray(count)
        warm = _warmup(self.init_value, self.peak_value, self.warmup_steps, count)
        decreased = count - self.warmup_steps - self.transition_begin
        p = (decreased / self.transition_steps).astype(jnp.float32)
        if self.staircase:
            p = jnp.floor(p)
        decayed = jnp.where(
            decreased <= 0,
            self.peak_value,
            self.peak_value * jnp.power(self.decay_rate, p),
        )
        if self.end_value is not None:
            decayed = jnp.where(
                self.decay_rate < 1.0,
                jnp.maximum(decayed, self.end_value),
                jnp.minimum(decayed, self.end_value),
            )
        return jnp.where(count < self.warmup_steps, warm, decayed)


def warmup_constant_schedule(
    init_value: float, peak_value: float, warmup_steps: int
) -> WarmupConstant:
    """Linear warmup to ``peak_value``, then constant.

    ``init_value + (peak_value - init_value) * min(t, W) / W`` for ``W =
    warmup_steps`` (which must be positive).
    """
    return WarmupConstant(
        init_value, peak_value, step_count(warmup_steps, "warmup_steps", minimum=1)
    )


def warmup_exponential_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> WarmupExponentialDecay:
    """Linear warmup to ``peak_value``, then exponential decay.

    For ``t < W = warmup_steps`` the warmup of :func:`warmup_constant_schedule`;
    then ``peak_value * decay_rate ** ((t - W - transition_begin) /
    transition_steps)`` (the exponent floored when ``staircase``), held at
    ``peak_value`` for the first ``transition_begin`` steps and bounded by
    ``end_value`` when given. ``warmup_steps = 0`` starts with the decay.
    """
    if end_value is not None:
        end_value = as_hyperparameter(end_value, name="end_value")
    return WarmupExponentialDecay(
        init_value,
        peak_value,
        step_count(warmup_steps, "warmup_steps"),
        step_count(transition_steps, "transition_steps", minimum=1),
        decay_rate,
        step_count(transition_begin, "transition_begin"),
        bool(staircase),
        end_value,
    )
