"""PartitionSpec arithmetic shared by the plan: normalising, stripping and
finding axes, comparing meshes, and the per-leaf layout record."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .._tree import path_str


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """How one trainable parameter is laid out, before and after ZeRO.

    ``base`` is the parameter's own spec (its tensor-parallel layout),
    ``partitioned`` the same with the data axes added on ``dim`` (None when the
    leaf stays in its own layout, for the reason in ``reason``).
    """

    path: str
    shape: tuple[int, ...]
    dtype: Any
    base: PartitionSpec
    partitioned: PartitionSpec
    dim: int | None
    reason: str | None


def with_sharding_constraint(x, s):
    return jax.lax.with_sharding_constraint(x, s)


def axes_of(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def normalise(spec: Any, ndim: int, name: str) -> PartitionSpec:
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(
            f"the PartitionSpec {spec} for {name} has {len(entries)} entries but "
            f"the leaf has {ndim} dims"
        )
    entries = entries + (None,) * (ndim - len(entries))
    out = []
    for e in entries:
        axes = axes_of(e)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def strip_axes(spec: PartitionSpec, data_axes: tuple[str, ...]) -> PartitionSpec:
    """``spec`` without the data axes (the tensor-parallel part of a layout)."""
    out = []
    for entry in spec:
        kept = tuple(a for a in axes_of(entry) if a not in data_axes)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def data_dim(spec: PartitionSpec, data_axes: tuple[str, ...]) -> int | None:
    for d, entry in enumerate(spec):
        if set(axes_of(entry)) & set(data_axes):
            return d
    return None


def pick(leaf: LeafLayout, partitioned: bool) -> PartitionSpec:
    return leaf.partitioned if partitioned else leaf.base


def same_mesh(a: Any, b: Mesh) -> bool:
    if tuple(a.axis_names) != tuple(b.axis_names):
        return False
    if tuple(a.axis_sizes) != tuple(b.axis_sizes):
        return False
    if not isinstance(a, Mesh):  # an AbstractMesh (traced, Explicit)
        return True
    return device_ids(a) == device_ids(b)


def device_ids(mesh: Any) -> list[int]:
    if not isinstance(mesh, Mesh):
        return []
    return [d.id for d in np.asarray(mesh.devices).flat]


def mesh_of(leaf: Any) -> Any:
    if isinstance(leaf, jax.core.Tracer):
        try:
            sharding = jax.typeof(leaf).sharding
        except AttributeError:
            return None
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or not mesh.axis_names:
            return None
        return mesh
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return sharding.mesh
    return None


def spec_lookup(specs: PyTree | None) -> Callable[[str], Any]:
    if specs is None:
        return lambda name: None
    flat = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, (PartitionSpec, NamedSharding))
    )[0]
    table = {path_str(p): s for p, s in flat}
    return table.get


def replace_trainable(params: PyTree, shardings: PyTree, fn) -> PyTree:
    def one(x, s):
        return x if s is None else fn(x, s)

    return jax.tree.map(
        one,
        params,
        shardings,
        is_leaf=lambda x: x is None,
    )


def leaf_path_names(tree: PyTree) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
