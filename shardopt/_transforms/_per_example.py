"""Per-example gradient clipping for differentially private training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from .._tree import describe
from .._tree_math import global_norm, promote


def _check_bound(value: ArrayLike, name: str) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a real number, got {type(value).__name__}"
        ) from err
    if array.shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {array.shape}")
    if np.isnan(array) or array < 0:
        raise ValueError(f"{name} must be >= 0 (inf allowed), got {value!r}")


def check_batched(grads: PyTree, name: str) -> list[Array]:
    leaves = jax.tree.leaves(grads)
    if not leaves:
        raise ValueError(f"{name} needs at least one gradient array")
    batch = leaves[0].shape[0] if leaves[0].ndim else None
    if batch is None or any(g.ndim < 1 or g.shape[0] != batch for g in leaves):
        shapes = ", ".join(describe(g) for g in leaves)
        raise ValueError(
            f"{name} expects every gradient to carry the same batch dimension "
            f"first (one row per example); got {shapes}"
        )
    return leaves


def _float(g: Array) -> Array:
    return g if jnp.issubdtype(g.dtype, jnp.inexact) else g.astype(jnp.float32)


def per_example_global_norm_clip(
    grads: PyTree, l2_norm_clip: ArrayLike
) -> tuple[PyTree, Array]:
    """Clip each example's gradient to global norm ``l2_norm_clip``, then sum.

    For examples ``b`` with gradients ``g_b`` (row ``b`` of every leaf):
    ``sum_b g_b * min(1, C / ||g_b||)``, returned with the number of examples
    that were clipped (int32). A zero gradient is kept as it is. Each sum is in
    its gradient's dtype (float32 for integer gradients).

    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
    """
    _check_bound(l2_norm_clip, "l2_norm_clip")
    check_batched(grads, "per_example_global_norm_clip")
    grads = jax.tree.map(_float, grads)
    norms = jax.vmap(global_norm)(grads)
    bound = jnp.asarray(l2_norm_clip)
    bound = bound.astype(norms.dtype)
    multipliers = jnp.nan_to_num(
        jnp.minimum(bound / norms, jnp.ones([], norms.dtype)), nan=1.0
    )
    clipped = jnp.sum(multipliers < 1, dtype=jnp.int32)

    def one(g):
        m, g_wide = promote(multipliers, g)
        return jnp.tensordot(m, g_wide, axes=1).astype(g.dtype)

    return jax.tree.map(one, grads), clipped


def per_example_layer_norm_clip(
    grads: PyTree, global_l2_norm_clip: ArrayLike, uniform: bool = True
) -> tuple[PyTree, PyTree]:
    """Clip each example's gradient leaf by leaf, then sum over examples.

    Leaf ``i`` of ``K`` leaves is clipped as in
    :func:`per_example_global_norm_clip` to ``C / sqrt(K)`` (``uniform``) or
    to ``C * sqrt(D_i / D)``, ``D_i`` its number of values per example and
    ``D`` theirs in all. Returns the tree of clipped sums and the tree of
    per-leaf counts of clipped examples.

    McMahan et al., "Learning Differentially Private Recurrent Language
    Models", ICLR 2018.
    """
    _check_bound(global_l2_norm_clip, "global_l2_norm_clip")
    leaves = check_batched(grads, "per_example_layer_norm_clip")
    if uniform:
        fractions = jax.tree.map(lambda _: 1.0 / len(leaves), grads)
    else:
        total = sum(int(np.prod(g.shape[1:])) for g in leaves)
        fractions = jax.tree.map(lambda g: int(np.prod(g.shape[1:])) / total, grads)
    pairs = jax.tree.map(
        lambda g, f: per_example_global_norm_clip(g, global_l2_norm_clip * f**0.5),
        grads,
        fractions,
    )
    outer = jax.tree.structure(grads)
    return jax.tree.transpose(outer, jax.tree.structure((0, 0)), pairs)
