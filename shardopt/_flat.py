"""Flat buffers: the trainable leaves of one dtype packed into one 1-D array.

An elementwise transform (each element's update and new state depend only on
the same element of the gradients, state and parameters, plus scalars such as
the count and the hyperparameters) gives the same numbers whether it runs on
every leaf apart or once on the leaves concatenated. Running it on a few long
buffers instead of thousands of small leaves makes the traced program, its
compile time and its per-step cost independent of the number of leaves.

:class:`FlatLayout` is the static map between a parameter tree and its buffers,
built once when an :class:`~shardopt.Optimizer` is made; :class:`Packed` is the
pytree node that holds the buffers, so a state made over packed parameters
shows where it mirrors them (``ScaleByAdamState(count, mu=Packed(...), ...)``).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._tree import path_str


class Packed(eqx.Module):
    """A parameter-shaped tree stored as one 1-D buffer per group of leaves."""

    buffers: tuple[Any, ...]


def is_packed(x: Any) -> bool:
    """True for a :class:`Packed` node (an ``is_leaf`` for tree maps)."""
    return isinstance(x, Packed)


class PackedStateViews(abc.ABC):
    """What a layout does to a whole optimizer state, given its ``pack`` and
    ``unpack``: show it per leaf (:meth:`view`) and pack it back
    (:meth:`pack_state`). Shared by :class:`FlatLayout` and the ZeRO plan's
    :class:`~shardopt.sharding._flat.ShardedFlatLayout`."""

    @abc.abstractmethod
    def pack(self, tree: PyTree) -> Packed:
        """The leaves of ``tree`` (the parameters' structure) in buffers."""

    @abc.abstractmethod
    def unpack(self, packed: Packed) -> PyTree:
        """The tree of :meth:`pack`'s input again, from the buffers."""

    # A layout is a static field of a jitted Module, hashed and compared on
    # every call: each subclass hashes its fields once, at construction.
    _hash: int

    @abc.abstractmethod
    def _identity(self) -> tuple:
        """The fields that make two layouts of this class equal."""

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not type(self) or self._hash != other._hash:
            return False
        return self._identity() == other._identity()

    def view(self, state: PyTree) -> PyTree:
        """``state`` with every :class:`Packed` node unpacked: the per-leaf state
        the transform would have made on the parameter tree itself."""
        return jax.tree.map(
            lambda x: self.unpack(x) if is_packed(x) else x, state, is_leaf=is_packed
        )

    def pack_state(self, state: PyTree, like: PyTree) -> PyTree:
        """The inverse of :meth:`view`: ``state`` (per leaf) packed where ``like``
        (a packed state of the same transform) holds :class:`Packed` nodes."""
        nodes, outer = jax.tree.flatten(like, is_leaf=is_packed)
        try:
            parts = outer.flatten_up_to(state)
        except (ValueError, TypeError) as err:
            raise ValueError(
                "the state given is not laid out like this optimizer's state "
                f"(per parameter): {err}"
            ) from err
        packed = [
            _placed_like(self.pack(part), node) if is_packed(node) else part
            for node, part in zip(nodes, parts, strict=True)
        ]
        return outer.unflatten(packed)


@dataclasses.dataclass(frozen=True, eq=False)
class FlatLayout(PackedStateViews):
    """Where each trainable leaf lives in the buffers: group, offset, shape.

    Leaves are grouped by dtype, in order of first appearance; within a group
    they follow the tree's leaf order. Static (hashed once), so it can sit in
    a static field of a jitted Module without costing a walk per call.
    """

    treedef: Any  # of the trainable tree (None where a leaf is not trained)
    shapes: tuple[tuple[int, ...], ...]  # per leaf, in tree order
    dtypes: tuple[str, ...]  # per group
    groups: tuple[tuple[int, ...], ...]  # leaf indices per group
    offsets: tuple[int, ...]  # per leaf: its first element in its group's buffer
    sizes: tuple[int, ...]  # per group: the buffer's length
    paths: tuple[str, ...]  # per leaf, for error messages
    _hash: int = dataclasses.field(default=0, compare=False, repr=False)

    @classmethod
    def of(cls, tree: PyTree) -> FlatLayout:
        """The layout of ``tree``'s leaves (arrays or ShapeDtypeStructs)."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        shapes = tuple(tuple(int(d) for d in leaf.shape) for _, leaf in flat)
        paths = tuple(path_str(path) for path, _ in flat)
        by_dtype: dict[str, list[int]] = {}
        for i, (_, leaf) in enumerate(flat):
            by_dtype.setdefault(jnp.dtype(leaf.dtype).name, []).append(i)
        offsets = [0] * len(flat)
        sizes = []
        for members in by_dtype.values():
            at = 0
            for i in members:
                offsets[i] = at
                at += int(np.prod(shapes[i], dtype=np.int64))
            sizes.append(at)
        fields = (
            treedef,
            shapes,
            tuple(by_dtype),
            tuple(tuple(m) for m in by_dtype.values()),
            tuple(offsets),
            tuple(sizes),
            paths,
        )
        return cls(*fields, _hash=hash(fields))

    def _identity(self) -> tuple:
        return (self.treedef, self.shapes, self.groups)

    @property
    def n_leaves(self) -> int:
        return len(self.shapes)

    def check(self, tree: PyTree, what: str) -> None:
        """Raise unless ``tree`` has this layout's structure and shapes."""
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            raise ValueError(
                f"the {what} are not laid out like the parameters the optimizer "
                f"was built for:\n  expected {self.treedef}\n  got      {treedef}"
            )
        for leaf, shape, path in zip(leaves, self.shapes, self.paths, strict=True):
            if tuple(leaf.shape) != shape:
                raise ValueError(
                    f"{what} leaf {path} has shape {tuple(leaf.shape)}; the "
                    f"optimizer was built for {shape}"
                )

    def pack(self, tree: PyTree) -> Packed:
        """The leaves of ``tree`` raveled and concatenated, one buffer per group."""
        leaves = self.treedef.flatten_up_to(tree)
        buffers = []
        for members, size in zip(self.groups, self.sizes, strict=True):
            parts = [leaves[i] for i in members]
            if any(isinstance(x, jax.ShapeDtypeStruct) for x in parts):
                buffers.append(jax.ShapeDtypeStruct((size,), parts[0].dtype))
            else:
                buffers.append(_concatenate([_ravel(x) for x in parts]))
        return Packed(tuple(buffers))

    def unpack(self, packed: Packed) -> PyTree:
        """The tree again: each leaf a slice of its group's buffer, reshaped.

        The slices start at offsets XLA sees only at run time
        (:func:`runtime_ints`), so all leaves of one size share one kernel.
        """
        leaves: list[Any] = [None] * self.n_leaves
        for members, buffer in zip(self.groups, packed.buffers, strict=True):
            if isinstance(buffer, jax.ShapeDtypeStruct):
                for i in members:
                    leaves[i] = jax.ShapeDtypeStruct(
                        self.shapes[i], buffer.dtype, sharding=_leaf_sharding(buffer)
                    )
                continue
            if len(members) == 1:
                (i,) = members
                leaves[i] = jax.lax.reshape(buffer, self.shapes[i])
            else:
                starts = [self.offsets[i] for i in members]
                for i, piece in zip(members, _slices(buffer, starts), strict=True):
                    leaves[i] = jax.lax.reshape(piece, self.shapes[i])
            if _concrete(buffer):  # a live array: placed as a leaf of it is
                for i in members:
                    leaves[i] = _placed(leaves[i], buffer.sharding)
        return self.treedef.unflatten(leaves)


def _slices(buffer: jax.Array, starts: list[int]) -> list[jax.Array]:
    """``buffer`` cut at ``starts`` (ascending, the first 0) into pieces."""
    ends = [*starts[1:], buffer.shape[0]]
    if buffer.shape[0] >= 2**31:  # beyond int32 offsets: static slices
        pairs = zip(starts, ends, strict=True)
        return [jax.lax.slice_in_dim(buffer, a, b) for a, b in pairs]
    if _concrete(buffer):  # eager: one cached dispatch per piece size
        offsets = [jnp.int32(a) for a in starts]
    else:
        offsets = runtime_ints(starts, buffer)
    return [
        jax.lax.dynamic_slice_in_dim(buffer, at, b - a, allow_negative_indices=False)
        for at, a, b in zip(offsets, starts, ends, strict=True)
    ]


def runtime_ints(values: list[int], anchor: jax.Array) -> tuple[jax.Array, ...]:
    """The int32 scalars ``values``, which XLA cannot see until run time.

    XLA:CPU compiles every distinct kernel (fusion) on its own, tens of
    milliseconds each, and identical kernels once. Slices at constant offsets
    are distinct kernels, one per leaf; slices at offsets given as operands
    are one kernel per slice size. The offsets come out of a conditional
    whose two branches hold the same constants, on a predicate read from
    ``anchor`` at run time: XLA folds neither branch into the slices, and
    whichever runs, the offsets are right.
    """
    constants = lambda: tuple(np.int32(v) for v in values)
    predicate = jnp.any(jnp.ravel(anchor)[:1] != 0)
    return jax.lax.cond(predicate, constants, constants)


def _ravel(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x if x.ndim == 1 else jax.lax.reshape(x, (x.size,))


def _concatenate(parts: list[jax.Array]) -> jax.Array:
    """``jnp.concatenate(parts)``, as concatenations of at most
    :data:`CONCAT_WIDTH` operands each, level by level.

    XLA:CPU emits one concatenation as one kernel whose code (and compile
    time) grows faster than its operand count; chunks of equal operand
    shapes are identical kernels, compiled once. The barrier keeps XLA from
    merging the levels back into one concatenation.
    """
    while len(parts) > CONCAT_WIDTH:
        chunks = [
            parts[i : i + CONCAT_WIDTH] for i in range(0, len(parts), CONCAT_WIDTH)
        ]
        parts = [c[0] if len(c) == 1 else jax.lax.concatenate(c, 0) for c in chunks]
        if not _concrete(parts[0]):
            parts = list(jax.lax.optimization_barrier(parts))
    return parts[0] if len(parts) == 1 else jax.lax.concatenate(parts, 0)


CONCAT_WIDTH = 64


def _placed_like(packed: Packed, like: Packed) -> Packed:
    """``packed``'s buffers put where ``like``'s are (a restore target's
    buffers, placed by hand), left where they are if ``like`` says nothing."""
    buffers = []
    for buffer, target in zip(packed.buffers, like.buffers, strict=True):
        sharding = getattr(target, "sharding", None)
        if sharding is not None and _concrete(buffer):
            buffer = jax.device_put(buffer, sharding)
        buffers.append(buffer)
    return Packed(tuple(buffers))


def _concrete(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def _placed(leaf: jax.Array, buffer_sharding: Any) -> jax.Array:
    """A slice of a buffer placed on a mesh, put as :func:`_leaf_sharding` says
    (arrays on one device without a mesh are left where they are)."""
    if getattr(buffer_sharding, "mesh", None) is None:
        return leaf
    like = jax.ShapeDtypeStruct((1,), leaf.dtype, sharding=buffer_sharding)
    return jax.device_put(leaf, _leaf_sharding(like))


def _leaf_sharding(buffer: jax.ShapeDtypeStruct) -> Any:
    """A leaf's placement as a buffer's implies it: the buffer's own where it
    is replicated, else replicated on the buffer's mesh (a slice of a
    partitioned buffer has no sharding of its own)."""
    sharding = buffer.sharding
    if sharding is None or sharding.is_fully_replicated:
        return sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None:
        return None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def flat_layout(transform: Any, params: PyTree, fuse: bool | None) -> FlatLayout | None:
    """The layout an optimizer of ``transform`` over the trainable ``params``
    packs them in, or ``None`` to keep its state leaf by leaf (see
    :func:`wants_flat`)."""
    return FlatLayout.of(params) if wants_flat(transform, params, fuse) else None


def wants_flat(transform: Any, params: PyTree, fuse: bool | None) -> bool:
    """Whether an optimizer of ``transform`` over the trainable ``params``
    packs them into flat buffers, with or without a ZeRO plan.

    ``fuse=True`` packs wherever the transform is elementwise; ``False``
    never; ``None`` (the default) where it is elementwise and the tree has at
    least :data:`AUTO_MIN_LEAVES` leaves, where flat buffers were measured
    faster per step and to compile (docs/benchmarks.md, "Flat buffers").
    ``fuse`` is checked by the caller (:func:`check_fuse`).
    """
    if fuse is False or not is_elementwise(transform):
        return False
    n_leaves = len(jax.tree.leaves(params))
    return n_leaves > 0 and (fuse is True or n_leaves >= AUTO_MIN_LEAVES)


def check_fuse(fuse: Any) -> None:
    """Raise unless ``fuse`` is ``True``, ``False`` or ``None``."""
    if fuse is not None and not isinstance(fuse, bool):
        raise TypeError(
            f"fuse must be True, False or None (automatic), got {fuse!r} of type "
            f"{type(fuse).__name__}"
        )


# the leaf count from which fuse=None packs (see wants_flat)
AUTO_MIN_LEAVES = 256


def is_elementwise(transform: Any) -> bool:
    """True if ``transform`` declares its update elementwise (see
    :meth:`~shardopt.AbstractTransform.is_elementwise`)."""
    method = getattr(transform, "is_elementwise", None)
    return bool(method()) if callable(method) else False
