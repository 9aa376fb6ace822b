"""Placing optimizer state: each state leaf is matched to the parameter whose
path its own path ends with, and laid out as a mirror or a factored copy."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
from jax.sharding import PartitionSpec
from jaxtyping import PyTree

from .._tree import describe, path_str, trainable
from ._specs import LeafLayout, axes_of, data_dim, normalise, pick

if TYPE_CHECKING:
    from ._plan import ShardingPlan


class FactoredState:
    """Mixin for state Modules whose leaves keep only some dims of a parameter.

    Row and column statistics (Adafactor) are smaller than the parameter they
    describe, so they cannot be recognised by shape alone. A state Module lists
    in ``factored_dims`` each such field with a function from the parameter's
    number of dimensions to the dims the leaf keeps, in order; the plan then
    gives each kept dim the parameter's (ZeRO) sharding of that dim::

        from typing import ClassVar
        from shardopt.sharding import FactoredState

        class FactoredStats(FactoredState, eqx.Module):
            factored_dims: ClassVar = {
                "row": lambda ndim: tuple(range(ndim - 1)),      # drops the last
                "col": lambda ndim: (*range(ndim - 2), ndim - 1),  # drops -2
            }
            row: jax.Array
            col: jax.Array

    Leaves that keep every dim with size 1 where they reduce (``keepdims=True``)
    need no declaration: the plan recognises them by shape.
    """

    factored_dims: ClassVar[Mapping[str, Callable[[int], tuple[int, ...]]]] = {}


@dataclasses.dataclass(frozen=True)
class StateLeaf:
    """How one optimizer-state leaf is placed: spec, kind, why not partitioned."""

    path: str
    shape: tuple[int, ...]
    dtype: Any
    spec: PartitionSpec
    kind: str  # "mirror", "factored", "quantized", "other" or "override"
    reason: str | None


def longest_suffix(path: tuple, by_path: dict) -> LeafLayout | None:
    for start in range(len(path) + 1):
        found = by_path.get(path[start:])
        if found is not None:
            return found
    return None


def declared_subtrees(state: PyTree) -> dict[tuple, tuple]:
    """Key path of each declared field -> the parameters' sub-tree it mirrors.

    A wrapper that initialises its inner transform on part of the parameters
    (lookahead's fast optimizer sees only ``params.fast``) gives its state
    Module a class attribute ``param_subtrees``: field name -> key path of
    that part. The field's leaves are then matched to the parameters under it.
    """
    declares = lambda x: isinstance(getattr(type(x), "param_subtrees", None), dict)
    found: dict[tuple, tuple] = {}
    for path, node in jax.tree_util.tree_flatten_with_path(state, is_leaf=declares)[0]:
        if declares(node):
            for name, prefix in type(node).param_subtrees.items():
                found[(*path, jax.tree_util.GetAttrKey(name))] = tuple(prefix)
    return found


def matching_param(path: tuple, by_path: dict, subtrees: dict) -> LeafLayout | None:
    """The parameter whose path the leaf's path ends with (inside its sub-tree)."""
    for field, prefix in subtrees.items():
        if path[: len(field)] == field:
            rest = path[len(field) :]
            for start in range(len(rest) + 1):
                found = by_path.get((*prefix, *rest[start:]))
                if found is not None:
                    return found
            return None
    return longest_suffix(path, by_path)


def _declares_kept_dims(node: Any) -> bool:
    # FactoredState, or any class with a ``factored_dims`` dict: transforms
    # declare it without importing this (higher) layer.
    return isinstance(getattr(type(node), "factored_dims", None), dict)


def declared_kept_dims(state: PyTree) -> dict[tuple, Callable]:
    """Key path of each leaf under a declared factored field -> its kept-dims rule."""
    found: dict[tuple, Callable] = {}
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_declares_kept_dims)[0]
    for path, node in flat:
        if not _declares_kept_dims(node):
            continue
        for name, rule in type(node).factored_dims.items():
            sub = jax.tree_util.tree_flatten_with_path(getattr(node, name))[0]
            for inner, _ in sub:
                key = (*path, jax.tree_util.GetAttrKey(name), *inner)
                found[key] = rule
    return found


def kept_dims(path, kept, shape, param) -> tuple[int | None, ...] | None:
    """For each dim of a factored leaf, the parameter dim it keeps (None: a dim
    of the leaf's own, e.g. a leading history dim, laid out unpartitioned)."""
    if path in kept:
        dims = tuple(kept[path](len(param.shape)))
        want = tuple(
            n if d is None else param.shape[d]
            for d, n in zip(dims, shape, strict=False)
        )
        if len(dims) != len(shape) or want != shape:
            raise ValueError(
                f"the factored state leaf ending in {param.path} has shape {shape}, "
                f"but its declared kept dims {dims} of the parameter "
                f"{param.shape} give {want}"
            )
        return dims
    if len(shape) == len(param.shape) and all(
        n == p or n == 1 for n, p in zip(shape, param.shape, strict=True)
    ):
        return tuple(d if n == param.shape[d] else None for d, n in enumerate(shape))
    return None


def _declares_blocks(node: Any) -> bool:
    # shardopt.QuantizedArray, or any class with a ``block_fields`` dict.
    return isinstance(getattr(type(node), "block_fields", None), dict)


def declared_blocks(state: PyTree) -> dict[tuple, tuple[tuple, int, tuple]]:
    """Key path of each leaf of a block-quantized node (8-bit state) -> the
    node's own path, its block size and the shape of the leaf it stands for.

    Such a node (:class:`shardopt.QuantizedArray`) replaces one state leaf by
    fields listed in its class attribute ``block_fields`` (codes of the leaf's
    shape, one scale per block along the last axis); all are matched to a
    parameter by the node's path and laid out alike (:func:`block_spec`).
    """
    found: dict[tuple, tuple[tuple, int, tuple]] = {}
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_declares_blocks)[0]
    for path, node in flat:
        if not _declares_blocks(node):
            continue
        for name in type(node).block_fields:
            key = (*path, jax.tree_util.GetAttrKey(name))
            found[key] = (tuple(path), node.block_size, tuple(node.shape))
    return found


def block_spec(
    plan: ShardingPlan, param: LeafLayout, zero: bool, block_size: int
) -> tuple[PartitionSpec, str | None]:
    """The layout of a block-quantized mirror of ``param`` (codes and scales).

    It is the mirrored moment's, unless that splits the last axis into shards
    that do not hold whole blocks: then the last axis is kept whole and ZeRO
    partitions another axis (or none, with the reason), so that a block's
    absmax never needs another device.
    """
    spec = pick(param, zero)
    last = param.shape[-1]
    shards = math.prod(plan.mesh.shape[a] for a in axes_of(spec[-1]))
    if shards == 1 or (last // shards) % block_size == 0:
        return spec, param.reason if zero else None
    why = (
        f"quantization blocks of {block_size} along its last axis ({last}) would "
        f"straddle that axis's {shards} shards, so the last axis is kept whole"
    )
    base = PartitionSpec(*param.base[:-1], None)
    if not zero:
        return base, why
    spec, _, reason = plan.zero_spec(base, param.shape, exclude=(len(param.shape) - 1,))
    return spec, None if reason is None else f"{reason}; {why}"


def place_state(plan: ShardingPlan, state: PyTree, params: PyTree) -> list[StateLeaf]:
    """How every array leaf of an optimizer state is placed, with the reason.

    A leaf whose key path ends with a trainable parameter's path is placed
    from that parameter: a *mirror* (same shape) like the mirrored state,
    a *factored* leaf (declared with :class:`FactoredState`, or reduced
    with size-1 dims) on the dims it keeps. Anything else (counts,
    scalars, leaves of no parameter) is replicated.
    """
    layout = plan.layout(params)
    by_path = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(trainable(params))[0]:
        by_path[tuple(path)] = layout[path_str(path)]
    kept = declared_kept_dims(state)
    subtrees = declared_subtrees(state)
    blocks = declared_blocks(state)
    overrides = dict(plan.overrides)
    zero = plan.stage >= 1
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = path_str(path)
        shape = tuple(leaf.shape)
        param = matching_param(tuple(path), by_path, subtrees)
        if name in overrides:
            spec = normalise(overrides[name], len(shape), name)
            out.append(StateLeaf(name, shape, leaf.dtype, spec, "override", None))
            continue
        if tuple(path) in blocks:
            node, block_size, value_shape = blocks[tuple(path)]
            param = matching_param(node, by_path, subtrees)
            if param is None or param.shape != value_shape:
                why = "it quantizes a leaf that mirrors no parameter"
                out.append(_unmatched(plan, name, leaf, why))
                continue
            spec, reason = block_spec(plan, param, zero, block_size)
            out.append(StateLeaf(name, shape, leaf.dtype, spec, "quantized", reason))
            continue
        if param is None:
            out.append(
                _unmatched(plan, name, leaf, "its path ends with no parameter's")
            )
            continue
        if shape == param.shape and tuple(path) not in kept:
            spec = pick(param, zero)
            reason = param.reason if zero else None
            out.append(StateLeaf(name, shape, leaf.dtype, spec, "mirror", reason))
            continue
        dims = kept_dims(tuple(path), kept, shape, param)
        if dims is None:
            why = f"its shape {shape} is neither {param.path}'s nor a reduction of it"
            out.append(_unmatched(plan, name, leaf, why))
            continue
        spec, reason = _factored_spec(plan, param, dims, shape, zero)
        out.append(StateLeaf(name, shape, leaf.dtype, spec, "factored", reason))
    return out


def _unmatched(plan: ShardingPlan, name: str, leaf: Any, why: str) -> StateLeaf:
    """A state leaf that mirrors no parameter: replicated, and said so when large.

    Counts and other scalars or small leaves are replicated without comment. A
    leaf of ``min_size`` elements or more costs its full size on every device,
    so the report gives the reason, and a strict plan raises.
    """
    shape = tuple(leaf.shape)
    reason = None
    if plan.stage >= 1 and shape and math.prod(shape) >= plan.min_size:
        reason = f"matches no parameter ({why}); replicated"
        if plan.strict:
            raise ValueError(
                f"strict plan: the optimizer state leaf at {name} "
                f"({describe(leaf)}) cannot be sharded: {reason}. Give it an "
                "override (shardopt.zero(..., overrides={path: PartitionSpec}))"
                " or use strict=False"
            )
    return StateLeaf(name, shape, leaf.dtype, PartitionSpec(), "other", reason)


def _factored_spec(plan: ShardingPlan, param, dims, shape, zero):
    source = pick(param, zero)
    entries = [None] * len(shape)
    for i, d in enumerate(dims):
        if d is not None and shape[i] == param.shape[d]:
            entries[i] = source[d]
    spec = PartitionSpec(*entries)
    if not zero or data_dim(spec, plan.data_axes) is not None:
        return spec, None
    # The data axes sat on a dim this leaf drops: place them on a kept one,
    # never on a dim of the leaf's own (a history dim is indexed by step).
    kept_shape = tuple(
        1 if d is None and n > 1 else n for d, n in zip(dims, shape, strict=True)
    )
    spec, _, reason = plan.zero_spec(spec, kept_shape)
    return spec, reason
