"""Scaling by a constant, a schedule or the learning rate."""

from __future__ import annotations

import equinox as eqx
import jax
from jaxtyping import Array

from .._base import AbstractCountingTransform, Identity, Params, Updates
from .._hyperparams import (
    NONNEGATIVE,
    Hyperparameter,
    ScalarOrSchedule,
    Schedule,
    hyperparameter,
    resolve,
)


class Scale(AbstractCountingTransform):
    """Multiply the updates by ``step_size`` (a float or a schedule of the count)."""

    elementwise = True

    step_size: Hyperparameter = hyperparameter("step_size")

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        del params
        step_size = resolve(self.step_size, count, name="step_size")
        return jax.tree.map(lambda g: step_size.astype(g.dtype) * g, grads)


class ScaleByLearningRate(AbstractCountingTransform):
    """Multiply the updates by ``-learning_rate`` (``+`` when ``flip_sign=False``)."""

    elementwise = True

    learning_rate: Hyperparameter = hyperparameter("learning_rate", NONNEGATIVE)
    flip_sign: bool = eqx.field(static=True, default=True)

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        del params
        rate = resolve(self.learning_rate, count, name="learning_rate")
        rate = -rate if self.flip_sign else rate
        return jax.tree.map(lambda g: rate.astype(g.dtype) * g, grads)


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
