"""Tree utilities: which leaves are trained, path names, and grads-vs-params checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree


def is_trainable(x: Any) -> bool:
    """True for floating arrays (concrete, traced or abstract): the leaves we train."""
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) and bool(
        jnp.issubdtype(x.dtype, jnp.inexact)
    )


def trainable(tree: PyTree) -> PyTree:
    """``tree`` with every non-trainable leaf replaced by ``None``."""
    return jax.tree.map(lambda x: x if is_trainable(x) else None, tree)


def path_str(path: tuple) -> str:
    """A key path as users write it (``['layers'][0].weight``), ``<root>`` if empty."""
    return jax.tree_util.keystr(path) if path else "<root>"


def leaf_paths(tree: PyTree) -> dict[str, Any]:
    """Map each leaf's path string to the leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(path): leaf for path, leaf in flat}


def describe(x: Any) -> str:
    """``float32[3,4]``-style description of an array-like leaf."""
    shape = ",".join(str(d) for d in x.shape)
    return f"{jnp.dtype(x.dtype).name}[{shape}]"


def check_grads_match(grads: PyTree, params: PyTree) -> None:
    """Raise if ``grads`` is not laid out exactly like the trainable ``params``.

    Runs at trace time (shapes and dtypes are static), so it costs nothing per
    step. Nothing is broadcast: every leaf must match in shape and dtype.
    """
    params, grads = trainable(params), trainable(grads)
    expected, got = leaf_paths(params), leaf_paths(grads)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra or jax.tree.structure(grads) != jax.tree.structure(params):
        lines = ["grads are not laid out like the trainable parameters."]
        if missing:
            lines.append(f"  missing from grads: {', '.join(missing)}")
        if extra:
            lines.append(f"  not among the parameters: {', '.join(extra)}")
        if not (missing or extra):
            lines.append(
                f"  same leaves, different containers:\n"
                f"    params: {jax.tree.structure(params)}\n"
                f"    grads:  {jax.tree.structure(grads)}"
            )
        raise ValueError("\n".join(lines))
    for path, param in expected.items():
        grad = got[path]
        if grad.shape != param.shape or grad.dtype != param.dtype:
            raise ValueError(
                f"the gradient at {path} is {describe(grad)} but the parameter is "
                f"{describe(param)}; grads must match their parameter in shape "
                "and dtype (nothing is broadcast or cast)."
            )


def check_per_example_grads_match(grads: PyTree, params: PyTree) -> None:
    """Raise unless each gradient is its parameter's shape with one leading
    batch dim, the same batch size for all, and the parameter's dtype."""
    params, grads = trainable(params), trainable(grads)
    expected, got = leaf_paths(params), leaf_paths(grads)
    if jax.tree.structure(grads) != jax.tree.structure(params):
        missing = ", ".join(sorted(set(expected) - set(got))) or "none"
        extra = ", ".join(sorted(set(got) - set(expected))) or "none"
        raise ValueError(
            "per-example grads are not laid out like the trainable parameters "
            f"(missing: {missing}; not among the parameters: {extra})"
        )
    batch = None
    for path, param in expected.items():
        grad = got[path]
        size = grad.shape[0] if grad.ndim == len(param.shape) + 1 else None
        if size is None or grad.shape[1:] != param.shape or grad.dtype != param.dtype:
            raise ValueError(
                f"this optimizer takes per-example gradients: the gradient at {path} "
                f"must be {jnp.dtype(param.dtype).name}[batch,"
                f"{','.join(str(d) for d in param.shape)}] (one row per example, "
                f"e.g. from jax.vmap(jax.grad(loss))), got {describe(grad)}"
            )
        if batch is not None and size != batch:
            raise ValueError(
                f"per-example gradients disagree on the batch size: {batch} "
                f"elsewhere, {size} at {path}"
            )
        batch = size


def _buffers(x: jax.Array) -> list[tuple[int, int]]:
    return [
        (shard.device.id, shard.data.unsafe_buffer_pointer())
        for shard in x.addressable_shards
    ]


def distinct_buffers(tree: PyTree, held: PyTree = None) -> PyTree:
    """``tree`` with every concrete array leaf in device buffers of its own.

    A leaf whose buffer an earlier leaf, or a leaf of ``held`` (what the
    caller keeps beside the tree: the parameters, the transform an optimizer
    was built from), already uses is copied:
    the same array placed twice, ``device_put`` of one value into several
    leaves, or an initial state that is the parameters or a hyperparameter
    (``jnp.asarray(x)`` is ``x``). Donating leaves that share a buffer fails
    ("donate the same buffer twice"), so every restore path and every new
    :class:`~shardopt.Optimizer` returns its trees through this.
    """
    live = lambda x: (
        isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and not x.is_deleted()
    )
    seen = {b for x in jax.tree.leaves(held) if live(x) for b in _buffers(x)}

    def own(x):
        if not live(x):
            return x
        buffers = _buffers(x)
        if seen.intersection(buffers):  # a copy, as committed as x was
            x = jax.device_put(x, x.sharding if x.committed else None, may_alias=False)
            buffers = _buffers(x)
        seen.update(buffers)
        return x

    return jax.tree.map(own, tree)


class StaticTree:
    """A tree of hashable leaves (a mask of bools, labels) held as structure.

    Kept in a static Module field, so ``jax.jit`` sees no leaves to trace and
    hashing the Module (``static_argnums``) works. ``convert`` is applied to
    each leaf first (``bool`` for masks); ``what`` names the argument in the
    error raised for a leaf that cannot be hashed.
    """

    __slots__ = ("leaves", "treedef")

    def __init__(
        self, tree: PyTree, convert: Any = None, what: str = "the tree"
    ) -> None:
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        leaves = []
        for path, leaf in flat:
            leaf = leaf if convert is None else convert(leaf)
            try:
                hash(leaf)
            except TypeError as err:
                raise TypeError(
                    f"{what} must hold hashable leaves (e.g. strings or bools), "
                    f"got {type(leaf).__name__} at {path_str(path)}"
                ) from err
            leaves.append(leaf)
        self.leaves = tuple(leaves)

    @property
    def tree(self) -> PyTree:
        return jax.tree.unflatten(self.treedef, self.leaves)

    def __hash__(self) -> int:
        return hash((self.treedef, self.leaves))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StaticTree)
            and self.treedef == other.treedef
            and self.leaves == other.leaves
        )

    def __repr__(self) -> str:
        return f"StaticTree({self.tree!r})"


class TreeStructure:
    """A tree structure (``PyTreeDef``) kept in a static Module field beside
    the leaves it arranges, stored flat (see :class:`shardopt.Optimizer`).

    It hashes and compares as its treedef. A copy shares it (a treedef is
    immutable), and pickling rebuilds it from a skeleton tree: a treedef's
    node data may hold markers compared by identity (Equinox's ``MISSING``),
    which a pickled treedef would not keep equal.
    """

    __slots__ = ("_hash", "treedef")

    def __init__(self, treedef: Any) -> None:
        self.treedef = treedef
        self._hash = hash(treedef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TreeStructure) and (
            self is other or self.treedef == other.treedef
        )

    def __copy__(self) -> TreeStructure:
        return self

    def __deepcopy__(self, memo: dict) -> TreeStructure:
        return self

    def __reduce__(self) -> tuple:
        td = self.treedef
        skeleton = jax.tree_util.tree_unflatten(td, [_Slot()] * td.num_leaves)
        return _structure_of, (skeleton,)

    def __repr__(self) -> str:
        return f"TreeStructure({self.treedef})"


class _Slot:
    """The leaf of a skeleton tree (pickles by value, unlike ``object()``)."""


def _structure_of(skeleton: PyTree) -> TreeStructure:
    return TreeStructure(jax.tree_util.tree_structure(skeleton))
