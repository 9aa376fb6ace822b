"""MADGRAD: momentumized, adaptive, dual averaged gradient steps."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._hyperparams import (
    NONNEGATIVE,
    UNIT_INTERVAL,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import (
    add,
    canonical_dtype,
    cast_like,
    copied,
    promote,
    widened,
    zeros_like,
)
from ._dog import NEEDS_PARAMS


class MadgradState(eqx.Module):
    count: Array
    grad_sum_sq: Updates  # G: the lambda-weighted sum of squared gradients
    s: Updates  # the lambda-weighted sum of gradients
    x0: Params  # the starting parameters


class ScaleByMadgrad(AbstractTransform):
    """MADGRAD's step: a dual average ``z`` mixed into the iterate by momentum.

    ``lambda_k = (lr + eps) sqrt(k + 1)``, ``G += lambda_k g^2``,
    ``s += lambda_k g``, ``z = x0 - s / (cbrt(G) + eps)``,
    ``x = (1 - momentum) z + momentum x``; the update is the move ``x_new - x``
    (so it carries its own sign and learning rate).

    Defazio & Jelassi, "A Momentumized, Adaptive, Dual Averaged Gradient Method
    for Stochastic Optimization", JMLR 2022 (arXiv 2021).

    ``accumulator_dtype`` stores the two sums ``G`` and ``s``: they are summed
    and used in float32 and rounded once when stored. ``x0`` stays in the
    parameters' dtype.
    """

    learning_rate: Hyperparameter = hyperparameter("learning_rate", NONNEGATIVE)
    momentum: Hyperparameter = hyperparameter("momentum", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    accumulator_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> MadgradState:
        sums = lambda: zeros_like(params, self.accumulator_dtype)
        return MadgradState(zero_count(), sums(), sums(), copied(params))

    def update(
        self, grads: Updates, state: MadgradState, params: Params | None = None
    ) -> tuple[Updates, MadgradState]:
        if params is None:
            raise ValueError(NEEDS_PARAMS.format(name="scale_by_madgrad"))
        count = state.count
        lr = resolve(self.learning_rate, count, name="learning_rate")
        momentum = resolve(self.momentum, count, name="momentum")
        eps = resolve(self.eps, count, name="eps")
        weight = (lr + eps) * jnp.sqrt((count + 1).astype(lr.dtype))
        dtype = self.accumulator_dtype
        wide_grads = widened(grads, dtype)
        grad_sum_sq = jax.tree.map(
            lambda acc, g: acc + _scaled(weight, g**2).astype(g.dtype),
            widened(state.grad_sum_sq, dtype),
            wide_grads,
        )
        s = jax.tree.map(
            lambda acc, g: acc + _scaled(weight, g).astype(g.dtype),
            widened(state.s, dtype),
            wide_grads,
        )

        def move(x0, s, acc, x):
            z = add(x0, -(s / (jnp.cbrt(acc) + eps.astype(acc.dtype))))
            new = add((1 - momentum).astype(z.dtype) * z, momentum.astype(x.dtype) * x)
            return add(new, -x)

        updates = jax.tree.map(move, state.x0, s, grad_sum_sq, params)
        grad_sum_sq = cast_like(grad_sum_sq, state.grad_sum_sq)
        s = cast_like(s, state.s)
        return updates, MadgradState(safe_increment(count), grad_sum_sq, s, state.x0)


def _scaled(scalar: Array, leaf: Array) -> Array:
    scalar, leaf = promote(scalar, leaf)
    return scalar * leaf


def scale_by_madgrad(
    learning_rate: ScalarOrSchedule,
    momentum: ScalarOrSchedule = 0.9,
    eps: ScalarOrSchedule = 1e-6,
    *,
    accumulator_dtype: DTypeLike | None = None,
) -> ScaleByMadgrad:
    """MADGRAD's update (the learning rate included: the result is the move).

    ``accumulator_dtype``: the dtype the two sums are stored in (default: each
    parameter's); a non-floating dtype is an error.
    """
    return ScaleByMadgrad(
        learning_rate,
        momentum,
        eps,
        canonical_dtype(accumulator_dtype, "accumulator_dtype"),
    )
