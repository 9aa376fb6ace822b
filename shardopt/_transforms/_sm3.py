"""SM3: an Adagrad-like accumulator kept as one vector per dim of each parameter."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._hyperparams import (
    CLOSED_UNIT_INTERVAL,
    NONNEGATIVE,
    UNIT_INTERVAL,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import add, canonical_dtype, cast_like, ema, widened, zeros_like


class ScaleBySm3State(eqx.Module):
    """SM3's accumulators and momentum.

    ``mu[i]`` is a tree like the parameters holding, for each leaf of two dims
    or more, its accumulator along dim ``i``: shaped like the leaf with every
    other dim of size 1 (so the ZeRO plan shards it on dim ``i``), None where
    the leaf has no dim ``i``. Scalars and vectors keep one accumulator shaped
    like themselves, in ``mu[0]``. ``nu`` is the momentum, like the parameters.
    """

    count: Array
    mu: tuple[Updates, ...]
    nu: Updates


def _cover(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes of a leaf's accumulators: one per dim (one, itself, below 2)."""
    if len(shape) < 2:
        return [shape]
    return [
        tuple(n if d == i else 1 for d, n in enumerate(shape))
        for i in range(len(shape))
    ]


class ScaleBySm3(AbstractTransform):
    """Divide by SM3's cover-based estimate of the summed squared gradients.

    For a leaf of ``k >= 2`` dims with accumulators ``mu_i`` (one entry per
    index of dim ``i``), per step::

        a   = c2 * g**2 + b2 * min_i mu_i          # broadcast over the leaf
        mu_i = max of a over every dim but i
        u   = g / sqrt(a + eps)   (0 where a == 0)
        nu  = b1 * nu + (1 - b1) * u               # emitted

    with ``c2 = 1 - b2`` (``1`` when ``b2 == 1``: plain sums, SM3-II).
    Scalars and vectors keep one accumulator per element. Anil, Gupta, Koren
    & Singer, "Memory-Efficient Adaptive Optimization", NeurIPS 2019.

    Partitioned parameter: the accumulators are stored sharded on the dim
    they keep. Per step, each ``mu_i`` whose max runs over a partitioned dim
    costs one all-reduce (max) of ``mu_i``'s size (for a leaf partitioned on
    one dim, ``k - 1`` small all-reduces, which XLA may combine); ``mu_i`` of
    the partitioned dim is local, and ``min_i mu_i`` is a broadcast of the
    local shards. Nothing of the leaf's size is gathered.

    Storage dtypes (default: each parameter's): ``accumulator_dtype`` for the
    ``mu_i``, ``mu_dtype`` for the momentum (the state's ``nu``); each is
    updated in float32 and rounded once when stored.
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", CLOSED_UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    accumulator_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    mu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleBySm3State:
        leaves, treedef = jax.tree.flatten(params)
        depth = max((len(_cover(tuple(p.shape))) for p in leaves), default=0)
        mu = []
        for i in range(depth):
            mu.append(
                treedef.unflatten(
                    [
                        _zeros_or_none(
                            _cover(tuple(p.shape)), i, self.accumulator_dtype or p.dtype
                        )
                        for p in leaves
                    ]
                )
            )
        momentum = zeros_like(params, self.mu_dtype)
        return ScaleBySm3State(zero_count(), tuple(mu), momentum)

    def update(
        self, grads: Updates, state: ScaleBySm3State, params: Params | None = None
    ) -> tuple[Updates, ScaleBySm3State]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        eps = resolve(self.eps, state.count, name="eps")
        c2 = jnp.where(b2 == 1, jnp.ones_like(b2), 1 - b2)
        leaves, treedef = jax.tree.flatten(grads)
        per_dim = [treedef.flatten_up_to(tree) for tree in state.mu]
        steps, new_mu = [], [[] for _ in state.mu]
        for j, g in enumerate(leaves):
            old = [tree[j] for tree in per_dim if tree[j] is not None]
            stored = [x.dtype for x in old]
            g = widened(g, self.accumulator_dtype)
            old = widened(old, self.accumulator_dtype)
            smallest = functools.reduce(jnp.minimum, old)
            accum = add(c2.astype(g.dtype) * g**2, b2.astype(smallest.dtype) * smallest)
            inverse = jnp.where(
                accum > 0,
                jax.lax.rsqrt(accum + eps.astype(accum.dtype)),
                jnp.zeros((), accum.dtype),
            )
            steps.append(g * inverse.astype(g.dtype))
            for i, bucket in enumerate(new_mu):
                if i >= len(old):
                    bucket.append(None)
                elif g.ndim < 2:
                    bucket.append(accum.astype(stored[i]))
                else:
                    others = tuple(d for d in range(g.ndim) if d != i)
                    peak = jnp.max(accum, axis=others, keepdims=True)
                    bucket.append(peak.astype(stored[i]))
        steps = treedef.unflatten(steps)
        nu = jax.tree.map(
            lambda u, m: ema(u, m, b1, 1),
            widened(steps, self.mu_dtype),
            widened(state.nu, self.mu_dtype),
        )
        mu = tuple(treedef.unflatten(bucket) for bucket in new_mu)
        stored_nu = cast_like(nu, state.nu)
        return nu, ScaleBySm3State(safe_increment(state.count), mu, stored_nu)


def _zeros_or_none(cover: list[tuple[int, ...]], i: int, dtype) -> Array | None:
    return jnp.zeros(cover[i], dtype) if i < len(cover) else None


def scale_by_sm3(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 1.0,
    eps: ScalarOrSchedule = 1e-8,
    *,
    accumulator_dtype: DTypeLike | None = None,
    mu_dtype: DTypeLike | None = None,
) -> ScaleBySm3:
    """Rescale updates by SM3's per-dim accumulators, then average with momentum.

    ``accumulator_dtype`` / ``mu_dtype``: the dtypes the accumulators and the
    momentum are stored in (default: each parameter's).
    """
    return ScaleBySm3(
        b1,
        b2,
        eps,
        canonical_dtype(accumulator_dtype, "accumulator_dtype"),
        canonical_dtype(mu_dtype, "mu_dtype"),
    )
