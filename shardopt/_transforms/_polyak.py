"""Polyak's step size: the suboptimality gap over the squared gradient norm."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike

from .._base import (
    AbstractTransform,
    CountState,
    Params,
    Updates,
    safe_increment,
    zero_count,
)
from .._hyperparams import (
    NONNEGATIVE,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import promote, squared_norm

VARIANTS = ("sps", "sps+")
# optax's threshold below which the squared norm counts as zero: float64's eps.
_TINY = float(np.finfo(float).eps)


class ScaleByPolyak(AbstractTransform):
    """Scale the updates by the stochastic Polyak step size.

    ``u = min((f(x) - f_min) / (||g||^2 + eps), max_learning_rate) * g``, with
    the gap replaced by its positive part for ``variant="sps+"`` and a zero step
    when ``||g||^2 + eps`` is below float64's machine epsilon. ``update`` needs
    the loss: ``update(grads, state, params, value=loss)`` (through an
    Optimizer: ``opt.step(params, grads, value=loss)``).

    Loizou et al., "Stochastic Polyak Step-size for SGD: An Adaptive Learning
    Rate for Fast Convergence", AISTATS 2021; ``sps+``: Garrigos et al.,
    "Function Value Learning: Adaptive Learning Rates Based on the Polyak
    Stepsize and Function Splitting in ERM", arXiv:2307.14528, 2023.
    """

    f_min: Hyperparameter = hyperparameter("f_min")
    max_learning_rate: Hyperparameter = hyperparameter("max_learning_rate", NONNEGATIVE)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    variant: str = eqx.field(static=True)
    takes_extra_args = True

    def __check_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    def init(self, params: Params) -> CountState:
        del params
        return CountState(zero_count())

    def update(
        self,
        grads: Updates,
        state: CountState,
        params: Params | None = None,
        *,
        value: ArrayLike | None = None,
        **extra_args: object,
    ) -> tuple[Updates, CountState]:
        del params, extra_args
        if value is None:
            raise ValueError(
                "scale_by_polyak needs the loss: call update(grads, state, "
                "params, value=loss), or Optimizer.step(params, grads, value=loss)"
            )
        count = state.count
        f_min = resolve(self.f_min, count, name="f_min")
        max_rate = resolve(self.max_learning_rate, count, name="max_learning_rate")
        eps = resolve(self.eps, count, name="eps")
        norm = squared_norm(grads)
        value = jnp.asarray(value)
        if value.shape != ():
            raise ValueError(f"value must be a scalar loss, got shape {value.shape}")
        if not jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(norm.dtype)
        gap = (value - f_min.astype(value.dtype)).astype(norm.dtype)
        if self.variant == "sps+":
            gap = jnp.maximum(gap, jnp.zeros_like(gap))
        denominator = norm + eps.astype(norm.dtype)
        rate = jnp.minimum(gap / denominator, max_rate.astype(norm.dtype))
        step = jnp.where(denominator <= _TINY, jnp.zeros_like(rate), rate)

        def scale(g):
            s, g = promote(step, g)
            return s * g

        return jax.tree.map(scale, grads), CountState(safe_increment(count))


def scale_by_polyak(
    f_min: ScalarOrSchedule = 0.0,
    max_learning_rate: ScalarOrSchedule = 1.0,
    eps: ScalarOrSchedule = 0.0,
    variant: Literal["sps", "sps+"] = "sps",
) -> ScaleByPolyak:
    """Scale updates by Polyak's step size; ``update`` takes the loss as ``value``."""
    return ScaleByPolyak(f_min, max_learning_rate, eps, variant)
