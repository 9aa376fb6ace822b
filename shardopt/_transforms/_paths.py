"""Dotted parameter paths and the patterns that select parameters by them.

One canonical path for every kind of tree: the keys from the root to a leaf,
joined by dots. An Equinox attribute gives its name (``blocks``), a dict key
its ``str`` (``embed``), a list or tuple index its number (``0``); a Flax NNX
``Variable``'s own ``value`` key is dropped, so ``nnx.split(model)[1]`` and
its ``to_pure_dict()`` give the same paths. For example the weight of the
first block's attention layer is ``blocks.0.attn.weight`` in an Equinox
model, ``blocks.0.attn.kernel`` in NNX state and a nested dict alike.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

Predicate = Callable[[str, Any], bool]


def _key_name(key: Any) -> str:
    for attribute in ("name", "key", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)  # pragma: no cover - every key type of jax.tree_util has one


def _is_nnx_variable(x: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")  # never imported here: only if the user did
    return nnx is not None and isinstance(x, nnx.Variable)


def leaf_parts(tree: PyTree) -> list[tuple[tuple[str, ...], Any]]:
    """Each leaf of ``tree`` (``None`` excluded) with its path as components."""
    variables = {
        tuple(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=_is_nnx_variable
        )[0]
        if _is_nnx_variable(leaf)
    }
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = tuple(path)
        if path[:-1] in variables:
            path = path[:-1]
        out.append((tuple(_key_name(k) for k in path), leaf))
    return out


def dotted(parts: tuple[str, ...]) -> str:
    """The canonical path: components joined by dots (``<root>`` for a leaf tree)."""
    return ".".join(parts) if parts else "<root>"


def _glob_match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_glob_match(rest, parts[i:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], head)
        and _glob_match(rest, parts[1:])
    )


class PathPattern:
    """One way to select parameters: a glob, a regular expression or a predicate.

    * a ``str`` is a glob over the dotted path, component by component: ``*``
      matches within one component (``blocks.*.attn.weight``), ``**`` matches
      any number of whole components, none included (``**.norm.*``), ``?`` and
      ``[...]`` work as in :mod:`fnmatch`;
    * a compiled ``re.Pattern`` must match the whole dotted path
      (``re.fullmatch``);
    * a callable is called as ``predicate(path, leaf)`` with the dotted path and
      the leaf (an array, a tracer or a ``ShapeDtypeStruct``: read only its
      shape and dtype) and returns a bool.

    Hashable, so that a transform holding patterns stays a static structure.
    """

    __slots__ = ("kind", "source")

    def __init__(self, source: str | re.Pattern | Predicate) -> None:
        if isinstance(source, str):
            parts = source.split(".")
            if not source or any(not part for part in parts):
                raise ValueError(
                    f"the path pattern {source!r} has an empty component; write "
                    "components separated by single dots, e.g. 'blocks.*.attn.*'"
                )
            self.kind, self.source = "glob", source
        elif isinstance(source, re.Pattern):
            self.kind, self.source = "regex", source
        elif callable(source):
            self.kind, self.source = "predicate", source
        else:
            raise TypeError(
                "a path pattern is a glob string, a compiled re.Pattern or a "
                f"predicate(path, leaf) -> bool; got {type(source).__name__}: "
                f"{source!r:.60}"
            )

    def matches(self, parts: tuple[str, ...], leaf: Any) -> bool:
        """Whether the leaf at path ``parts`` (components) is selected."""
        if self.kind == "glob":
            return _glob_match(tuple(self.source.split(".")), parts)
        if self.kind == "regex":
            return self.source.fullmatch(dotted(parts)) is not None
        result = self.source(dotted(parts), leaf)
        if not isinstance(result, (bool, np.bool_)):
            raise TypeError(
                f"the predicate {self} returned {type(result).__name__} for "
                f"{dotted(parts)}; it must return a Python bool (read only the "
                "leaf's shape and dtype, never its values)"
            )
        return bool(result)

    def __str__(self) -> str:
        if self.kind == "glob":
            return repr(self.source)
        if self.kind == "regex":
            return f"re.compile({self.source.pattern!r})"
        name = getattr(self.source, "__qualname__", type(self.source).__name__)
        return f"predicate {name}"

    __repr__ = __str__

    def __hash__(self) -> int:
        return hash((self.kind, self.source))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PathPattern)
            and self.kind == other.kind
            and self.source == other.source
        )


def as_patterns(match: Any) -> tuple[PathPattern, ...]:
    """``match`` (one pattern or a list/tuple of them) as PathPatterns."""
    if isinstance(match, PathPattern):
        return (match,)
    if isinstance(match, (list, tuple)):
        if not match:
            raise ValueError("a group needs at least one path pattern")
        return tuple(p for m in match for p in as_patterns(m))
    return (PathPattern(match),)
