"""Scaling by a constant, a schedule or the learning rate."""

from __future__ import annotations

import equinox as eqx
import jax

from .._base import (
    AbstractTransform,
    CountState,
    Identity,
    Params,
    Updates,
    safe_increment,
    zero_count,
)
from .._hyperparams import (
    Hyperparameter,
    ScalarOrSchedule,
    Schedule,
    hyperparameter,
    resolve,
)


class Scale(AbstractTransform):
    """Multiply the updates by ``step_size`` (a float or a schedule of the count)."""

    step_size: Hyperparameter = hyperparameter("step_size")

    def init(self, params: Params) -> CountState:
        del params
        return CountState(zero_count())

    def update(
        self, grads: Updates, state: CountState, params: Params | None = None
    ) -> tuple[Updates, CountState]:
        del params
        step_size = resolve(self.step_size, state.count, name="step_size")
        updates = jax.tree.map(lambda g: step_size.astype(g.dtype) * g, grads)
        return updates, CountState(safe_increment(state.count))


class ScaleByLearningRate(AbstractTransform):
    """Multiply the updates by ``-learning_rate`` (``+`` when ``flip_sign=False``)."""

    learning_rate: Hyperparameter = hyperparameter("learning_rate", nonnegative=True)
    flip_sign: bool = eqx.field(static=True, default=True)

    def init(self, params: Params) -> CountState:
        del params
        return CountState(zero_count())

    def update(
        self, grads: Updates, state: CountState, params: Params | None = None
    ) -> tuple[Updates, CountState]:
        del params
        rate = resolve(self.learning_rate, state.count, name="learning_rate")
        rate = -rate if self.flip_sign else rate
        updates = jax.tree.map(lambda g: rate.astype(g.dtype) * g, grads)
        return updates, CountState(safe_increment(state.count))


def scale(step_size: ScalarOrSchedule) -> Scale:
    """Multiply updates by ``step_size``."""
    return Scale(step_size)


def scale_by_schedule(step_size_fn: Schedule) -> Scale:
    """Multiply updates by ``step_size_fn(count)``."""
    return Scale(step_size_fn)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule | None, *, flip_sign: bool = True
) -> ScaleByLearningRate | Identity:
    """Multiply updates by ``-learning_rate``; ``None`` means no scaling."""
    if learning_rate is None:
        return Identity()
    return ScaleByLearningRate(learning_rate, flip_sign)
