"""The objective's value and gradient, reused from a line search's state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree

from .._base import AbstractTransform, Params, State, Updates
from .._explicit import match_sharding
from .._tree import path_str

_MISSING = object()


def _fields(node: Any) -> list[tuple[Any, str, Any]]:
    """``(key, name, child)`` for the named and indexed children of ``node``."""
    if isinstance(node, jax.Array) or node is None:
        return []
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [
            (jax.tree_util.GetAttrKey(f.name), f.name, getattr(node, f.name))
            for f in dataclasses.fields(node)
            if not f.metadata.get("static", False)
        ]
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # a NamedTuple
        return [
            (jax.tree_util.GetAttrKey(name), name, getattr(node, name))
            for name in node._fields
        ]
    if isinstance(node, (tuple, list)):
        return [(jax.tree_util.SequenceKey(i), None, x) for i, x in enumerate(node)]
    if isinstance(node, dict):
        return [(jax.tree_util.DictKey(k), k, v) for k, v in node.items()]
    return []


def find_in_state(state: State, name: str) -> list[tuple[str, Any]]:
    """Every field, NamedTuple field or dict entry called ``name`` in ``state``.

    Returns ``(path, value)`` pairs; the search does not descend below a match.
    """
    found: list[tuple[str, Any]] = []

    def visit(node: Any, path: tuple) -> None:
        for key, field_name, child in _fields(node):
            here = (*path, key)
            if field_name == name:
                found.append((path_str(here), child))
            else:
                visit(child, here)

    visit(state, ())
    return found


def _one(state: State, name: str) -> Any:
    found = find_in_state(state, name)
    if len(found) > 1:
        raise ValueError(
            f"the state holds several entries named {name!r} (at "
            f"{', '.join(p for p, _ in found)}); value_and_grad_from_state needs "
            "exactly one line search in the optimizer"
        )
    if not found or found[0][1] is None:
        where = f" ({found[0][0]} is None)" if found else ""
        raise ValueError(
            f"no {name} found in the state{where}: value_and_grad_from_state reads "
            "the value and gradient a line search stored (scale_by_zoom_linesearch, "
            "or scale_by_backtracking_linesearch with store_grad=True)"
        )
    return found[0][1]


def value_and_grad_from_state(
    value_fn: Callable[..., ArrayLike],
) -> Callable[..., tuple[Array, Updates]]:
    """Like ``jax.value_and_grad(value_fn)``, but reusing the line search's last point.

    The returned function is called as ``f(params, *args, state=state,
    **kwargs)``. A line search ends by evaluating the objective (and its
    gradient) at the parameters it accepts, and keeps both in its state as
    ``value`` and ``grad``; when the stored value is finite they are returned
    as they are, otherwise (at the first step) they are computed. That saves
    one evaluation per step for deterministic objectives; with a new batch
    every step, use ``jax.value_and_grad`` instead. Gradients are taken as
    ``eqx.filter_value_and_grad`` takes them (``None`` where a leaf is not a
    float array), so an Equinox model works as well as a tree of arrays.
    ``state`` is an optimizer state, or a :class:`shardopt.Optimizer`; it
    must hold exactly one ``value`` and one ``grad``.
    """
    if not callable(value_fn):
        raise TypeError(
            f"value_fn must be a function of the parameters, got "
            f"{type(value_fn).__name__}"
        )
    # Equinox's filter: the gradient has None where a leaf is not a float array
    # (as the stored one has), so a model with non-array leaves works too.
    compute = eqx.filter_value_and_grad(value_fn)

    def value_and_grad(
        params: Params, *args: Any, state: PyTree = _MISSING, **kwargs: Any
    ) -> tuple[Array, Updates]:
        if state is _MISSING:
            raise TypeError(
                "value_and_grad_from_state's function needs the optimizer state "
                "as state=: f(params, state=opt_state)"
            )
        if isinstance(getattr(state, "transform", None), AbstractTransform):
            state = state.state  # a shardopt.Optimizer: its transform's state
        value, grad = _one(state, "value"), _one(state, "grad")

        # Only arrays go through the cond; functions and other leaves of an
        # Equinox model are closed over.
        operands, static = eqx.partition((params, args, kwargs), eqx.is_array)

        def fresh(operands):
            p, a, kw = eqx.combine(operands, static)
            new_value, new_grad = compute(p, *a, **kw)
            new_value = jnp.asarray(new_value).astype(value.dtype)
            new_grad = jax.tree.map(
                lambda n, g: match_sharding(n.astype(g.dtype), g), new_grad, grad
            )
            return new_value, new_grad

        stored = lambda operands: (value, grad)
        usable = jnp.isfinite(value)
        return jax.lax.cond(usable, stored, fresh, operands)

    return value_and_grad
