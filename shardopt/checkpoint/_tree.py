"""Trees as Orbax sees them: nested string-keyed dicts of arrays, and back.

Equinox modules hold callables, bools and activation functions next to their
arrays; Orbax can save only the arrays. A tree is saved as a nested ``dict``
whose keys are the path entries of its array leaves (field names, dict keys,
sequence indices), so a checkpoint reads the same whatever container types held
the arrays. Restoring goes the other way, into the structure of a target
("like") tree, whose non-array leaves are kept as they are.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
from jaxtyping import PyTree

Nested = dict[str, Any]


def is_arraylike(x: Any) -> bool:
    """An array leaf that can be saved: concrete, numpy, or abstract."""
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def entry_name(entry: Any) -> str:
    """The string key of one path entry: a field name, dict key or index."""
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def array_leaves(tree: PyTree) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` for every array leaf, in the tree's flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        eqx.filter(tree, is_arraylike, replace=None)
    )
    return [(tuple(entry_name(k) for k in path), leaf) for path, leaf in flat]


def to_nested(tree: PyTree) -> Nested:
    """The array leaves of ``tree`` as a nested dict keyed by path entries."""
    out: Nested = {}
    for path, leaf in array_leaves(tree):
        if not path:
            raise ValueError("a bare array cannot be saved as a tree; wrap it")
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"two leaves share the path {'/'.join(path)}")
        if path[-1] in node:
            raise ValueError(f"two leaves share the path {'/'.join(path)}")
        node[path[-1]] = leaf
    return out


def nested_paths(nested: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """``'a/b/0' -> leaf`` for a nested dict (lists count as index-keyed dicts)."""
    if isinstance(nested, dict):
        items = nested.items()
    elif isinstance(nested, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(nested))
    else:
        return {"/".join(prefix): nested}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(nested_paths(value, (*prefix, str(key))))
    return out


def from_nested(nested: Nested, like: PyTree) -> PyTree:
    """Put the arrays of ``nested`` into the structure of ``like``.

    Every array leaf of ``like`` is replaced by the array at the same path; its
    other leaves (callables, bools, static structure) are kept.
    """
    flat = nested_paths(nested)
    arrays = eqx.filter(like, is_arraylike, replace=None)
    leaves, treedef = jax.tree_util.tree_flatten(arrays)
    paths = [p for p, _ in array_leaves(like)]
    assert len(paths) == len(leaves)
    restored = jax.tree_util.tree_unflatten(treedef, [flat["/".join(p)] for p in paths])
    rest = eqx.filter(like, is_arraylike, inverse=True, replace=None)
    return eqx.combine(restored, rest, is_leaf=lambda x: x is None)


def find_mesh(tree: PyTree) -> jax.sharding.Mesh | None:
    """The mesh of the first leaf laid out with a NamedSharding, if any."""
    for _, leaf in array_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def replicated(mesh: jax.sharding.Mesh | None) -> jax.sharding.Sharding:
    """Replicated over ``mesh``; the default device without a mesh."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, PartitionSpec())


def abstract_target(tree: PyTree, mesh: jax.sharding.Mesh | None = None) -> Nested:
    """The restore target for ``tree``: ShapeDtypeStructs with shardings.

    Live arrays give their own sharding. Abstract leaves keep theirs; one
    without a sharding, and every scalar that is not already laid out with a
    NamedSharding, is replicated over ``mesh`` (the tree's own mesh by default),
    so counts restore identically on any number of processes.
    """
    mesh = mesh if mesh is not None else find_mesh(tree)
    nested = to_nested(tree)

    def target(leaf):
        sharding = getattr(leaf, "sharding", None)
        unplaced = isinstance(leaf, np.ndarray) or sharding is None
        if unplaced or (leaf.shape == () and not isinstance(sharding, NamedSharding)):
            sharding = replicated(mesh)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(target, nested)


def for_saving(nested: Nested) -> Nested:
    """Make every leaf savable from any number of processes.

    numpy leaves become arrays; with several processes, a leaf held by one
    device of this process only (a count made by ``jnp.zeros``) becomes a
    replicated global array, since Orbax cannot save host-local arrays there.
    """
    multi = jax.process_count() > 1
    mesh = None
    if multi:
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))

    def fix(leaf):
        if isinstance(leaf, np.ndarray):
            leaf = jax.numpy.asarray(leaf)
        if multi and leaf.is_fully_addressable:
            value = np.asarray(leaf)
            return jax.make_array_from_callback(
                value.shape, replicated(mesh), lambda index: value[index]
            )
        return leaf

    return jax.tree.map(fix, nested)


def describe_sharding(sharding: Any) -> str:
    """A short description: ``mesh(data=4, model=2) P('data', None)``."""
    if isinstance(sharding, NamedSharding):
        axes = ", ".join(f"{n}={s}" for n, s in sharding.mesh.shape.items())
        return f"mesh({axes}) {sharding.spec}"
    if isinstance(sharding, SingleDeviceSharding):
        return f"single device {next(iter(sharding.device_set))}"
    return type(sharding).__name__ if sharding is not None else "unknown"


def split_empty(nested: Any, prefix: str = "") -> tuple[Any, dict[str, Any]]:
    """``(nested without its zero-size leaves, {path: zero-size leaf})``.

    Orbax refuses to write arrays with no elements; they hold no data, so a
    checkpoint records only their shape and dtype and rebuilds them on restore.
    """
    if not isinstance(nested, dict):
        if getattr(nested, "size", 1) == 0:
            return None, {prefix: nested}
        return nested, {}
    kept, empty = {}, {}
    for key, value in nested.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        sub, found = split_empty(value, path)
        empty.update(found)
        if sub is not None and not (isinstance(sub, dict) and not sub):
            kept[key] = sub
    return kept, empty


def put_path(nested: Nested, path: str, value: Any) -> None:
    """Set ``nested['a']['b']...`` for the path ``'a/b/...'``, creating dicts."""
    keys = path.split("/")
    for key in keys[:-1]:
        nested = nested.setdefault(key, {})
    nested[keys[-1]] = value


def empty_like(target: jax.ShapeDtypeStruct) -> jax.Array:
    """A zero-size array of ``target``'s shape and dtype, in its layout."""
    value = np.zeros(target.shape, target.dtype)
    return jax.make_array_from_callback(
        target.shape, target.sharding, lambda index: value[index]
    )
