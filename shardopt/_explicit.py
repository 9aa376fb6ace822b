"""Helpers for arrays on meshes with Explicit axes.

There an array's type carries its sharding, and JAX raises where an
operation's output layout would be ambiguous (a contraction or a reshape over
a sharded dim) or where operands' layouts differ; with Auto axes the
partitioner picks layouts itself and these helpers do nothing.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array


def explicit_sharding(x: Array) -> NamedSharding | None:
    """``x``'s sharding when its mesh has Explicit axes, else None."""
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.axis_names or not mesh.are_all_axes_explicit:
        return None
    return sharding


def match_sharding(x: Array, reference: Array, drop_leading: bool = False) -> Array:
    """``x`` laid out like ``reference`` (without its first dim if ``drop_leading``).

    Only on meshes with Explicit axes, where mixing layouts in one operation is
    an error; with Auto axes the partitioner picks the layouts itself.
    """
    sharding = explicit_sharding(reference)
    if sharding is None:
        return x
    spec = tuple(sharding.spec) + (None,) * (reference.ndim - len(sharding.spec))
    spec = PartitionSpec(*(spec[1:] if drop_leading else spec))
    if explicit_sharding(x) is not None and jax.typeof(x).sharding.spec == spec:
        return x
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, spec))


def replicated_if_explicit(x: Array) -> NamedSharding | None:
    """The replicated sharding on ``x``'s mesh when its axes are Explicit (an
    ``out_sharding`` for a result that must not stay sharded), else None."""
    sharding = explicit_sharding(x)
    return None if sharding is None else NamedSharding(sharding.mesh, PartitionSpec())


def replicated(x: Array) -> Array:
    """``x`` gathered whole onto every device of its mesh where its axes are
    Explicit (for operations that need the whole array), else ``x``."""
    target = replicated_if_explicit(x)
    return x if target is None else jax.sharding.reshard(x, target)
