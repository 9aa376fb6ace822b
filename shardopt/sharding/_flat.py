"""Flat buffers under a ZeRO plan: each device's part of a buffer is that
device's own shards of the leaves, concatenated.

Without a plan (:mod:`shardopt._flat`) a dtype's leaves are raveled and
concatenated into one 1-D buffer. Under a plan every leaf of mirrored state
(moments, traces) is laid out by the plan: partitioned over the data axes
where ZeRO partitions it, over the tensor-parallel axes where the parameter
is, and replicated elsewhere. Concatenating the whole leaves would cut
across those shards; instead a buffer here is the concatenation, over the
devices of the mesh in order, of each device's *part*: the raveled local
shards of the leaves (in the plan's mirrored layout) that the device holds.
The buffer is partitioned over all mesh axes, one part per device, so

* a device holds exactly the bytes the per-leaf state holds on it (a leaf
  the plan replicates is in every device's part, as it is in every device's
  memory per leaf);
* packing and unpacking are local (``jax.shard_map`` over the parts, no
  collective), so a step has the per-leaf step's collectives;
* an elementwise update on the buffers computes, on each device, the very
  numbers the per-leaf update computes on that device's shards.

The global buffer is a storage format: its elements are in device order, not
in the parameters' order, and a replicated leaf appears once per device.
Everything outside the step reads the state per leaf (``opt.state``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .._flat import FlatLayout, Packed, PackedStateViews, is_packed
from ._specs import normalise

if TYPE_CHECKING:
    from ._plan import ShardingPlan


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedFlatLayout(PackedStateViews):
    """Where each trainable leaf lives in the buffers under a plan.

    ``whole`` is the parameters' own :class:`~shardopt._flat.FlatLayout`
    (tree, shapes, paths for checks); ``local`` the layout of one device's
    shards of them (each device's part of a buffer); ``specs`` each leaf's
    mirrored-state PartitionSpec, which fixes its local shard. Static and
    hashed once, like ``FlatLayout``.
    """

    whole: FlatLayout
    local: FlatLayout
    specs: tuple[PartitionSpec, ...]  # per leaf, in tree order
    mesh: Mesh
    _hash: int = dataclasses.field(default=0, compare=False, repr=False)

    @classmethod
    def of(cls, plan: ShardingPlan, params: PyTree) -> ShardedFlatLayout:
        """The layout of the trainable ``params`` under ``plan``: each leaf's
        local shard in the plan's mirrored-state layout."""
        whole = FlatLayout.of(params)
        specs = whole.treedef.flatten_up_to(plan.mirror_specs(params))
        specs = tuple(
            normalise(spec, len(shape), path)
            for spec, shape, path in zip(specs, whole.shapes, whole.paths, strict=True)
        )
        leaves = whole.treedef.flatten_up_to(params)
        local_leaves = [
            jax.ShapeDtypeStruct(
                NamedSharding(plan.mesh, spec).shard_shape(shape), leaf.dtype
            )
            for leaf, spec, shape in zip(leaves, specs, whole.shapes, strict=True)
        ]
        local = FlatLayout.of(whole.treedef.unflatten(local_leaves))
        fields = (whole, local, specs, plan.mesh)
        return cls(*fields, _hash=hash(fields))

    def _identity(self) -> tuple:
        return (self.whole, self.local, self.specs, self.mesh)

    # ---------------------------------------------------------------- shape
    @property
    def n_leaves(self) -> int:
        return self.whole.n_leaves

    @property
    def sizes(self) -> tuple[int, ...]:
        """Per group: the global buffer's length (a part per device)."""
        return tuple(size * self.mesh.size for size in self.local.sizes)

    @property
    def part_sizes(self) -> tuple[int, ...]:
        """Per group: the length of one device's part."""
        return self.local.sizes

    def buffer_sharding(self) -> NamedSharding:
        """Every buffer's sharding: one part per device of the mesh."""
        return NamedSharding(self.mesh, PartitionSpec(tuple(self.mesh.axis_names)))

    def leaf_shardings(self) -> list[NamedSharding]:
        """Each leaf's sharding when unpacked (its mirrored state's)."""
        return [NamedSharding(self.mesh, spec) for spec in self.specs]

    def check(self, tree: PyTree, what: str) -> None:
        """Raise unless ``tree`` has the parameters' structure and shapes."""
        self.whole.check(tree, what)

    # ------------------------------------------------------- pack / unpack
    def pack(self, tree: PyTree) -> Packed:
        """``tree`` (laid out as the plan mirrors the parameters) packed: each
        device's part of buffer ``g`` is its local shards of group ``g``."""
        leaves = self.whole.treedef.flatten_up_to(tree)
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
            sharding = self.buffer_sharding()
            return Packed(
                tuple(
                    jax.ShapeDtypeStruct(
                        (size,), leaves[members[0]].dtype, sharding=sharding
                    )
                    for members, size in zip(self.whole.groups, self.sizes, strict=True)
                )
            )
        if _concrete(leaves):  # placed first: a no-op where they are already
            shardings = self.leaf_shardings()
            leaves = [
                jax.device_put(x, s) for x, s in zip(leaves, shardings, strict=True)
            ]
            return Packed(self._compiled("pack")(*leaves))
        return Packed(self._pack_parts(*leaves))

    def unpack(self, packed: Packed) -> PyTree:
        """The tree again, each leaf in its mirrored-state layout."""
        buffers = tuple(packed.buffers)
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in buffers):
            leaves: list[Any] = [None] * self.n_leaves
            shardings = self.leaf_shardings()
            for members, buffer in zip(self.whole.groups, buffers, strict=True):
                for i in members:
                    leaves[i] = jax.ShapeDtypeStruct(
                        self.whole.shapes[i], buffer.dtype, sharding=shardings[i]
                    )
        elif _concrete(buffers):
            leaves = self._compiled("unpack")(*buffers)
        else:
            leaves = self._unpack_parts(*buffers)
        return self.whole.treedef.unflatten(list(leaves))

    def _pack_parts(self, *leaves: jax.Array) -> tuple[jax.Array, ...]:
        def local(*shards):
            return self.local.pack(self.local.treedef.unflatten(shards)).buffers

        part = self.buffer_sharding().spec
        out = (part,) * len(self.local.sizes)
        return jax.shard_map(
            local, mesh=self.mesh, in_specs=self.specs, out_specs=out, check_vma=False
        )(*leaves)

    def _unpack_parts(self, *buffers: jax.Array) -> tuple[jax.Array, ...]:
        def local(*parts):
            tree = self.local.unpack(Packed(parts))
            return tuple(self.local.treedef.flatten_up_to(tree))

        part = self.buffer_sharding().spec
        # check_vma=False: a leaf the plan replicates over an axis is in every
        # part along it, equal by construction, which shard_map cannot prove
        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(part,) * len(buffers),
            out_specs=self.specs,
            check_vma=False,
        )(*buffers)

    def _compiled(self, direction: str) -> Any:
        """``pack``/``unpack`` of live arrays, jitted once per layout."""
        cache = self.__dict__.setdefault("_jitted", {})
        if direction not in cache:
            if direction == "pack":
                shardings = (self.buffer_sharding(),) * len(self.local.sizes)
                fn = jax.jit(self._pack_parts, out_shardings=shardings)
            else:
                fn = jax.jit(
                    self._unpack_parts, out_shardings=tuple(self.leaf_shardings())
                )
            cache[direction] = fn
        return cache[direction]

    # ---------------------------------------------------------------- state
    def state_shardings(self, state: PyTree, plan: ShardingPlan) -> PyTree:
        """Shardings of a packed state: its buffers one part per device, every
        other leaf (counts, scalars) replicated on the plan's mesh."""
        buffer = self.buffer_sharding()

        def one(node):
            if is_packed(node):
                return Packed(tuple(buffer for _ in node.buffers))
            return plan.replicated()

        return jax.tree.map(one, state, is_leaf=is_packed)

    def matches_plan(self, packed_state: PyTree, per_leaf_specs: PyTree) -> str | None:
        """Why the packed state would not be laid out as the plan lays out the
        per-leaf state, or None where it is: every leaf under a
        :class:`Packed` node must have its parameter's mirrored spec (a state
        override can give a moment another), every other leaf replicated."""
        nodes, outer = jax.tree.flatten(packed_state, is_leaf=is_packed)
        is_spec = lambda x: isinstance(x, PartitionSpec)
        try:
            parts = outer.flatten_up_to(per_leaf_specs)
        except (ValueError, TypeError) as err:
            return f"the packed state does not mirror the per-leaf state: {err}"
        for node, part in zip(nodes, parts, strict=True):
            if not is_packed(node):
                if any(axis for axis in part if axis is not None):
                    return f"a state leaf outside the buffers is laid out as {part}"
                continue
            specs = jax.tree.leaves(part, is_leaf=is_spec)
            if len(specs) != self.n_leaves:
                n = len(specs)
                return f"a packed state node mirrors {n} leaves, not {self.n_leaves}"
            pairs = zip(
                specs, self.specs, self.whole.shapes, self.whole.paths, strict=True
            )
            for spec, want, shape, path in pairs:
                if normalise(spec, len(shape), path) != want:
                    return (
                        f"the state of {path} is laid out as {spec}, the "
                        f"parameter's mirror as {want}"
                    )
        return None


def _concrete(xs: Any) -> bool:
    """True unless a leaf is traced: live arrays (or host arrays, which
    :meth:`ShardedFlatLayout.pack` places first) go through a compiled call."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)
