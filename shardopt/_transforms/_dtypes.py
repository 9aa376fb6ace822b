"""The lowest or highest dtype of a tree's leaves, as optax picks its state dtypes."""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import PyTree


def _ordered(a: jnp.dtype, b: jnp.dtype, which: str) -> jnp.dtype:
    with jax.numpy_dtype_promotion("standard"):
        joined = jnp.promote_types(a, b)
    if joined not in (a, b):
        raise ValueError(
            f"the parameters mix {a} and {b}, neither of which promotes to the "
            f"other, so there is no {which} dtype among them"
        )
    if which == "highest":
        return joined
    return b if joined == a else a


def tree_dtype(tree: PyTree, which: Literal["lowest", "highest"]) -> jnp.dtype:
    """The lowest or highest leaf dtype (``a <= b`` when ``a`` promotes to ``b``).

    Leaves may be arrays, tracers or ShapeDtypeStructs; an empty tree gives
    float32, JAX's default.
    """
    dtypes = [jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)]
    if not dtypes:
        return jnp.dtype(jnp.float32)
    return functools.reduce(functools.partial(_ordered, which=which), dtypes)
