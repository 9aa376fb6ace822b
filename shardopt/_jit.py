"""``jit_step``: a jitted training step whose per-call cost is one flattening.

``eqx.filter_jit`` splits its arguments into arrays and the rest in Python on
every call (a partition, a hashable partition and a combine, each a walk over
every leaf of the model and the optimizer), so its dispatch grows with the
leaf count at Python speed. ``jit_step`` does that split once per structure:
a call flattens its arguments once (``jax.tree_util.tree_flatten``, in C++),
finds the split of that tree structure in a cache, picks the array leaves by
their positions (``operator.itemgetter``, in C) and hands them to a
``jax.jit`` of the flat function, with the donated ones in an argument of
their own. The results are rebuilt with one unflattening.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def is_traced(leaf: Any) -> bool:
    """Whether ``leaf`` becomes an input of the compiled step (as in
    ``eqx.is_array``): JAX and NumPy arrays; every other leaf is static."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _picker(indices: Sequence[int]) -> Callable[[list], tuple]:
    """A function taking the leaves at ``indices`` from a list, as a tuple."""
    if not indices:
        return lambda leaves: ()
    if len(indices) == 1:
        (only,) = indices
        return lambda leaves: (leaves[only],)
    return operator.itemgetter(*indices)


class _Split:
    """One argument structure: which leaves are traced, donated or static, the
    jitted flat function, and the structure of its results."""

    def __init__(self, fn, leaves, treedef, donate_argnums):
        arg_of_leaf = [
            arg
            for arg, sub in enumerate(treedef.children())
            for _ in range(sub.num_leaves)
        ]
        traced = [is_traced(x) for x in leaves]
        donates = [arg_of_leaf[i] in donate_argnums for i in range(len(leaves))]
        self.donated = [i for i, t in enumerate(traced) if t and donates[i]]
        self.kept = [i for i, t in enumerate(traced) if t and not donates[i]]
        self.static = [i for i, t in enumerate(traced) if not t]
        self.take_donated = _picker(self.donated)
        self.take_kept = _picker(self.kept)
        self.take_static = _picker(self.static)
        self.static_values = self.take_static(leaves)
        self.results = None  # (treedef, static positions, static values)
        n_leaves = len(leaves)

        def flat(donated, kept):
            full = [None] * n_leaves
            for i, x in zip(self.donated, donated, strict=True):
                full[i] = x
            for i, x in zip(self.kept, kept, strict=True):
                full[i] = x
            for i, x in zip(self.static, self.static_values, strict=True):
                full[i] = x
            out = fn(*jax.tree_util.tree_unflatten(treedef, full))
            out_leaves, out_def = jax.tree_util.tree_flatten(out)
            static = [i for i, x in enumerate(out_leaves) if not is_traced(x)]
            results = (out_def, static, [out_leaves[i] for i in static])
            if self.results is not None and not _same_results(self.results, results):
                raise ValueError(
                    f"{getattr(fn, '__name__', fn)!r} returned another structure "
                    "(or other non-array leaves) for arrays of new shapes or "
                    "dtypes; jit_step needs the structure of the results to depend "
                    "on the structure of the arguments only (use eqx.filter_jit)"
                )
            self.results = results
            return [x for i, x in enumerate(out_leaves) if is_traced(x)]

        self.jitted = jax.jit(flat, donate_argnums=(0,) if self.donated else ())

    def matches(self, leaves: list) -> bool:
        return self.take_static(leaves) == self.static_values

    def call(self, leaves: list) -> Any:
        out = self.jitted(self.take_donated(leaves), self.take_kept(leaves))
        out_def, static, values = self.results
        if static:
            for i, value in zip(static, values, strict=True):  # ascending: final places
                out.insert(i, value)
        return jax.tree_util.tree_unflatten(out_def, out)


def _same_results(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or a[1] != b[1]:
        return False
    return all(x is y or x == y for x, y in zip(a[2], b[2], strict=True))


class JitStep:
    """The callable :func:`jit_step` returns; ``splits`` counts the argument
    structures it has seen (each one compiled once per shapes and dtypes)."""

    def __init__(self, fn: Callable, donate_argnums: frozenset[int]):
        self.fn = fn
        self.donate_argnums = donate_argnums
        self._cache: dict[Any, list[_Split]] = {}
        functools.update_wrapper(self, fn)

    @property
    def splits(self) -> int:
        return sum(len(v) for v in self._cache.values())

    def _split(self, leaves: list, treedef: Any) -> _Split:
        candidates = self._cache.setdefault(treedef, [])
        for split in candidates:
            if split.matches(leaves):
                return split
        split = _Split(self.fn, leaves, treedef, self.donate_argnums)
        candidates.append(split)
        return split

    def __call__(self, *args: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        split = self._split(leaves, treedef)
        try:
            return split.call(leaves)
        except TypeError:
            # a leaf that was an array is now some other object: jax.jit
            # rejected it; split anew (static there) and call again
            if all(is_traced(x) for x in split.take_donated(leaves)) and all(
                is_traced(x) for x in split.take_kept(leaves)
            ):
                raise
            self._cache[treedef].remove(split)
            split = self._split(leaves, treedef)
            return split.call(leaves)

    def lower(self, *args: Any) -> Any:
        """``jax.jit(...).lower`` of the flat step for these arguments (to
        compile ahead of time or read its HLO)."""
        leaves, treedef = jax.tree_util.tree_flatten(args)
        split = self._split(leaves, treedef)
        return split.jitted.lower(split.take_donated(leaves), split.take_kept(leaves))


def jit_step(fn: Callable, *, donate_argnums: int | Sequence[int] = ()) -> JitStep:
    """``fn`` compiled, taking pytrees of arrays and anything else (an Equinox
    model, a :class:`~shardopt.Optimizer`) like ``eqx.filter_jit``: array
    leaves are traced, every other leaf is static.

    A call costs one flattening of the arguments (in C++) and one
    unflattening of the results; which leaves are arrays is worked out once
    per tree structure and cached, so the dispatch stays close to a plain
    ``jax.jit`` on the array leaves alone (``eqx.filter_jit`` walks every leaf
    in Python three times a call). The array leaves of the positional
    arguments in ``donate_argnums`` are donated: their buffers are reused for
    the results, as ``jax.jit``'s ``donate_argnums``.

    Positional arguments only. The structure of ``fn``'s results (and their
    non-array leaves) must follow from the structure of its arguments, as
    for a training step; a result structure that changes with array shapes
    raises.

    Example::

        params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
        opt = shardopt.Optimizer(shardopt.adamw(1e-2), params)

        def train_step(params, opt, x):
            grads = jax.grad(lambda p: jnp.sum((x @ p["w"] + p["b"]) ** 2))(params)
            return opt.step(params, grads)

        train_step = shardopt.jit_step(train_step, donate_argnums=(0, 1))
        params, opt = train_step(params, opt, jnp.ones((2, 4)))
    """
    if isinstance(donate_argnums, int):
        donate_argnums = (donate_argnums,)
    if not callable(fn):
        raise TypeError(f"jit_step needs a function, got {type(fn).__name__}")
    for n in donate_argnums:
        if not isinstance(n, int) or n < 0:
            raise ValueError(
                f"donate_argnums must be non-negative argument positions, got {n!r}"
            )
    return JitStep(fn, frozenset(donate_argnums))
