"""Differentially private aggregation of per-example gradients (DP-SGD).

The gradients come one per example (a leading batch dim on every leaf):
``Optimizer.step`` accepts them in that shape when the transform (or the
first transform of a chain) is this one. The noise key is carried in the
state and split as optax splits it, so the numbers are optax's.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .._base import AbstractTransform, Params, Updates
from .._hyperparams import NONNEGATIVE, POSITIVE, Hyperparameter, hyperparameter
from .._tree_math import global_norm, promote
from ._noise import resolve_key
from ._per_example import check_batched


class DifferentiallyPrivateAggregateState(eqx.Module):
    """The noise key's raw data (uint32), so it saves and shards as an array."""

    rng_key: Array


class DifferentiallyPrivateAggregate(AbstractTransform):
    r"""Clip each example's gradient, sum, add Gaussian noise, average.

    For a batch of ``B`` per-example gradients ``g_b``:
    ``u = (\sum_b g_b \min(1, C / \|g_b\|) + C \sigma z) / B`` with
    ``z ~ N(0, I)`` (``C = l2_norm_clip``, ``\sigma = noise_multiplier``).
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
    """

    l2_norm_clip: Hyperparameter = hyperparameter("l2_norm_clip", POSITIVE)
    noise_multiplier: Hyperparameter = hyperparameter("noise_multiplier", NONNEGATIVE)
    key_data: Array = eqx.field(converter=jnp.asarray)
    key_impl: str = eqx.field(static=True)

    def expects_per_example_grads(self) -> bool:
        return True

    def init(self, params: Params) -> DifferentiallyPrivateAggregateState:
        del params
        return DifferentiallyPrivateAggregateState(self.key_data)

    def update(
        self,
        grads: Updates,
        state: DifferentiallyPrivateAggregateState,
        params: Params | None = None,
    ) -> tuple[Updates, DifferentiallyPrivateAggregateState]:
        del params
        leaves, treedef = jax.tree.flatten(grads)
        batch = leaves[0].shape[0]
        clip = jnp.asarray(self.l2_norm_clip)
        clipped = _clipped_sums(leaves, clip)
        std = clip * jnp.asarray(self.noise_multiplier)
        key = jax.random.wrap_key_data(state.rng_key, impl=self.key_impl)
        new_key, *keys = jax.random.split(key, len(leaves) + 1)
        noised = [
            (g + std.astype(g.dtype) * jax.random.normal(k, g.shape, g.dtype)) / batch
            for g, k in zip(clipped, keys, strict=True)
        ]
        new_state = DifferentiallyPrivateAggregateState(jax.random.key_data(new_key))
        return jax.tree.unflatten(treedef, noised), new_state


def _clipped_sums(leaves: list[Array], clip: Array) -> list[Array]:
    """``sum_b g_b min(1, C / ||g_b||)`` per leaf, in the dtype promoted with
    the norms (float32 for a bfloat16 leaf), as optax sums for this transform.

    :func:`~shardopt.per_example_global_norm_clip` returns each sum in its
    leaf's dtype instead; the norms and multipliers are the same.
    """
    check_batched(leaves, "differentially_private_aggregate")
    norms = jax.vmap(global_norm)(leaves)
    ratio = clip.astype(norms.dtype) / norms
    multipliers = jnp.nan_to_num(jnp.minimum(ratio, jnp.ones([], norms.dtype)), nan=1.0)

    def one(g):
        m, g = promote(multipliers, g)
        return jnp.tensordot(m, g, axes=1)

    return [one(g) for g in leaves]


def differentially_private_aggregate(
    l2_norm_clip: float,
    noise_multiplier: float,
    key: ArrayLike | None = None,
    *,
    seed: int | None = None,
) -> DifferentiallyPrivateAggregate:
    """DP-SGD's aggregation: clip per example, sum, add noise, average.

    Expects per-example gradients (every leaf with a leading batch dim, e.g.
    ``jax.vmap(jax.grad(loss), in_axes=(None, 0))``) and must come first in a
    chain. ``key`` is a PRNG key or an int seed (``seed`` is optax's
    deprecated name for it); without either, seed 0 with a warning. Abadi et
    al., "Deep Learning with Differential Privacy", CCS 2016.
    """
    key = resolve_key(key, seed, "differentially_private_aggregate")
    return DifferentiallyPrivateAggregate(
        l2_norm_clip,
        noise_multiplier,
        jax.random.key_data(key),
        str(jax.random.key_impl(key)),
    )
