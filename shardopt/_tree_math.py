"""The numerics shared by transforms, written once with explicit dtypes.

Scalars (hyperparameters) are cast to the dtype of the array they multiply,
which is how optax's weakly typed Python floats behave; arrays of different
dtypes are promoted explicitly, so the code runs under strict dtype promotion.
"""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ._explicit import replicated_if_explicit


def promote(*arrays: Array) -> tuple[Array, ...]:
    """The arrays cast to their common dtype on JAX's standard promotion lattice.

    Explicit, so that it also holds where users enable strict promotion.
    """
    with jax.numpy_dtype_promotion("standard"):
        dtype = functools.reduce(jnp.promote_types, (a.dtype for a in arrays))
    return tuple(a.astype(dtype) for a in arrays)


def add(a: Array, b: Array) -> Array:
    """``a + b`` in the promoted dtype."""
    a, b = promote(a, b)
    return a + b


def ema(grad: Array, moment: Array, decay: Array, order: int) -> Array:
    """``(1 - decay) * grad**order + decay * moment``: a moment's moving average."""
    new = (1 - decay).astype(grad.dtype) * grad**order
    return add(new, decay.astype(moment.dtype) * moment)


def bias_correction(moment: Array, decay: Array, count: Array) -> Array:
    """``moment / (1 - decay**count)``; the factor is computed in float32."""
    factor = 1 - decay ** count.astype(decay.dtype)
    return moment / factor.astype(moment.dtype)


def zeros_like(tree: PyTree, dtype: jnp.dtype | None = None) -> PyTree:
    """Zeros shaped like each leaf (arrays, tracers or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, dtype or x.dtype), tree)


def full_like(tree: PyTree, value: Array, dtype: jnp.dtype | None = None) -> PyTree:
    """``value`` shaped like each leaf, in ``dtype`` (by default the leaf's),
    in buffers of their own: for a scalar leaf ``jnp.full`` returns ``value``
    itself, a hyperparameter, which donating the state would delete."""

    def fill(x):
        out = jnp.full(x.shape, value.astype(dtype or x.dtype))
        return jnp.copy(out) if out is value else out

    return jax.tree.map(fill, tree)


def copied(tree: PyTree) -> PyTree:
    """A copy of each leaf, for a state that starts as the parameters (or a
    hyperparameter): donating both would donate one buffer twice."""
    return jax.tree.map(jnp.copy, tree)


def cast(tree: PyTree, dtype: jnp.dtype | None) -> PyTree:
    """Every leaf cast to ``dtype``; unchanged when ``dtype`` is None."""
    return tree if dtype is None else jax.tree.map(lambda x: x.astype(dtype), tree)


def widened(tree: PyTree, dtype: jnp.dtype | None) -> PyTree:
    """``tree`` with every leaf in at least float32 when a storage ``dtype`` is
    given (see :func:`widen`); unchanged when ``dtype`` is None."""
    return tree if dtype is None else jax.tree.map(widen, tree)


def cast_like(tree: PyTree, reference: PyTree) -> PyTree:
    """Every leaf cast to the dtype of the matching leaf of ``reference``."""
    return jax.tree.map(lambda x, r: x.astype(r.dtype), tree, reference)


def global_norm(tree: PyTree) -> Array:
    """The L2 norm of all leaves together: ``sqrt(sum_i sum(leaf_i ** 2))``.

    Each leaf is summed in its own dtype, then the sums are added in order.
    """
    return jnp.sqrt(squared_norm(tree))


class StorageDtypeError(TypeError, ValueError):
    """A state dtype that is not floating (or not a dtype at all).

    Both a ValueError (a bad value for the argument) and a TypeError (what
    NumPy raises for a name that is no dtype), so either ``except`` catches it.
    """


def canonical_dtype(
    dtype: jnp.dtype | str | None, name: str = "dtype"
) -> jnp.dtype | None:
    """``dtype`` as a NumPy dtype (honouring x64 settings), or None.

    State is stored in it, so it must be floating (or complex): anything else
    is a :class:`StorageDtypeError` naming the argument ``name``.
    """
    if dtype is None:
        return None
    try:
        canonical = jax.dtypes.canonicalize_dtype(dtype)
    except TypeError as err:
        raise StorageDtypeError(
            f"{name} must be a floating dtype, got {dtype!r}"
        ) from err
    if not jnp.issubdtype(canonical, jnp.inexact):
        raise StorageDtypeError(
            f"{name} must be a floating dtype (e.g. jnp.bfloat16 or jnp.float32), "
            f"got {canonical.name}: moments and accumulators hold fractions"
        )
    return canonical


def storage_dtype_field(name: str) -> Any:
    """A static Module field holding a storage dtype (default: the
    parameters'), for transforms built directly from their class: the
    argument ``name`` is checked as :func:`canonical_dtype` checks it."""
    return eqx.field(
        static=True, default=None, converter=lambda d: canonical_dtype(d, name)
    )


def widen(x: Array) -> Array:
    """``x`` in at least float32, for arithmetic on a moment stored narrower.

    bfloat16 and float16 moments are computed in float32 and rounded once
    when stored; float32 and float64 pass through.
    """
    with jax.numpy_dtype_promotion("standard"):
        return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def squared_norm(tree: PyTree) -> Array:
    """``sum_i sum(leaf_i ** 2)``: each leaf summed in its own dtype, then the
    sums added in leaf order (as optax's ``tree.norm(..., squared=True)``)."""
    total = jnp.zeros([], jnp.int32)
    for leaf in jax.tree.leaves(tree):
        total = add(total, jnp.sum(jnp.square(leaf)))
    return total


def contract(x: Array, y: Array, accumulate: Any = None) -> Array:
    """``<x, y>`` over every dim: one ``tensordot`` at the highest matmul
    precision (accumulating in ``accumulate``, where given). With Explicit mesh
    axes the scalar is asked for replicated (JAX cannot tell the layout of a
    contraction over a sharded dim): the partitioner adds the per-shard sums."""
    return jnp.tensordot(
        x,
        y,
        x.ndim,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=accumulate,
        out_sharding=replicated_if_explicit(x),
    )


def vdot(a: PyTree, b: PyTree) -> Array:
    """``sum_i <a_i, b_i>``: per leaf at the highest matmul precision in the pair's
    promoted dtype, then the dots added in leaf order (as optax's ``tree.vdot``)."""
    total = jnp.zeros([], jnp.int32)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        total = add(total, contract(*promote(x, y)))
    return total


def lowest_dtype(tree: PyTree) -> jnp.dtype:
    """The lowest dtype of the leaves: the one every other leaf's promotes from.

    optax keeps the scalars of some wrappers (Mechanic's scale, Schedule-Free's
    weights) in this dtype, so a tree that mixes bfloat16 and float32 gets
    bfloat16 scalars. Raises naming both dtypes when neither promotes to the other.
    """
    dtypes = [jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)]
    if not dtypes:
        return jnp.dtype(jnp.float32)

    def lower(a: jnp.dtype, b: jnp.dtype) -> jnp.dtype:
        with jax.numpy_dtype_promotion("standard"):
            promoted = jnp.promote_types(a, b)
        if promoted == a:
            return b
        if promoted == b:
            return a
        raise ValueError(f"the parameters' dtypes {a} and {b} have no lower one")

    return functools.reduce(lower, dtypes)
