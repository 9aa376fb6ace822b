"""Sign-based updates: the plain sign, Lion."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array

from .._base import (
    AbstractStatelessTransform,
    AbstractTransform,
    Params,
    Updates,
    safe_increment,
    zero_count,
)
from .._hyperparams import (
    UNIT_INTERVAL,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import (
    add,
    canonical_dtype,
    cast,
    ema,
    zeros_like,
)


class ScaleBySign(AbstractStatelessTransform):
    """Replace every update value by its sign: ``u = sign(g)`` (0 stays 0).

    Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex
    Problems", ICML 2018.
    """

    elementwise = True

    def apply(self, grads: Updates, params: Params | None) -> Updates:
        del params
        return jax.tree.map(jnp.sign, grads)


class ScaleByLionState(eqx.Module):
    count: Array
    mu: Updates


class ScaleByLion(AbstractTransform):
    """Lion: the sign of an interpolation between momentum and gradient.

    Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023.
    """

    elementwise = True

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    mu_dtype: jnp.dtype | None = eqx.field(static=True)

    def init(self, params: Params) -> ScaleByLionState:
        return ScaleByLionState(zero_count(), zeros_like(params, self.mu_dtype))

    def update(
        self, grads: Updates, state: ScaleByLionState, params: Params | None = None
    ) -> tuple[Updates, ScaleByLionState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        updates = jax.tree.map(
            lambda g, m: jnp.sign(
                add((1 - b1).astype(g.dtype) * g, b1.astype(m.dtype) * m)
            ),
            grads,
            state.mu,
        )
        mu = jax.tree.map(lambda g, m: ema(g, m, b2, 1), grads, state.mu)
        mu = cast(mu, self.mu_dtype)
        return updates, ScaleByLionState(safe_increment(state.count), mu)


def scale_by_sign() -> ScaleBySign:
    """Rescale updates to their element-wise sign."""
    return ScaleBySign()


def scale_by_lion(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.99,
    mu_dtype: DTypeLike | None = None,
) -> ScaleByLion:
    """Rescale updates to the sign of Lion's momentum interpolation."""
    return ScaleByLion(b1, b2, canonical_dtype(mu_dtype, "mu_dtype"))
