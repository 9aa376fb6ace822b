"""Structural transforms: a flat view of the tree, functions as transforms,
gradient scaling in the backward pass, and non-negative parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from .._base import (
    AbstractStatelessTransform,
    AbstractTransform,
    Params,
    State,
    Updates,
    update_with_extra_args,
)
from .._explicit import match_sharding, replicated
from .._interop import as_transform
from .._tree_math import add, promote


class Flatten(AbstractTransform):
    """Run ``inner`` on one vector: every leaf raveled and concatenated.

    Leaves of different dtypes are promoted to their common dtype in the
    vector, and each update leaf comes back in that dtype (in its gradient's
    shape), as optax does: a bfloat16 leaf among float32 ones gets a float32
    update, which :func:`~shardopt.apply_updates` rounds once to the
    parameter's dtype.
    """

    inner: AbstractTransform
    takes_extra_args = True

    def init(self, params: Params) -> State:
        return self.inner.init(_ravel(params))

    def update(
        self,
        grads: Updates,
        state: State,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, State]:
        flat_params = None if params is None else _ravel(params)
        flat, state = update_with_extra_args(
            self.inner, _ravel(grads), state, flat_params, extra_args
        )
        return _unravel(flat, grads), state


def _ravel(tree: PyTree) -> Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros([0], jnp.float32)
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
        # abstract parameters: only the shapes matter to init.
        leaves = [jnp.zeros(x.shape, x.dtype) for x in leaves]
    # with Explicit mesh axes a sharded leaf cannot be raveled as it lies:
    # the vector is replicated (as every transform of it sees it anyway)
    return jnp.concatenate([jnp.ravel(replicated(x)) for x in promote(*leaves)])


def _unravel(flat: Array, like: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(like)
    offsets = np.cumsum([int(np.prod(x.shape)) for x in leaves])[:-1]
    pieces = jnp.split(flat, offsets) if leaves else []
    return jax.tree.unflatten(
        treedef,
        [
            match_sharding(piece.reshape(x.shape), x)
            for piece, x in zip(pieces, leaves, strict=True)
        ],
    )


def flatten(inner: Any) -> Flatten:
    """Run ``inner`` (shardopt or optax) on all the parameters as one flat vector.

    ``u = unravel(T(ravel(g)))``: fewer, larger operations for trees of many
    small leaves, at the cost of a copy. The inner state is a flat vector, so
    a ZeRO plan replicates it.
    """
    return Flatten(as_transform(inner, "flatten's inner transform"))


class Stateless(AbstractStatelessTransform):
    """A function ``f(updates, params) -> updates`` as a transform with no state."""

    f: Callable[[Updates, Params | None], Updates] = eqx.field(static=True)

    def apply(self, grads: Updates, params: Params | None) -> Updates:
        return self.f(grads, params)


class StatelessWithTreeMap(AbstractStatelessTransform):
    """A function of one update array and its parameter, mapped over the tree."""

    f: Callable[[Array, Array | None], Array] = eqx.field(static=True)

    def apply(self, grads: Updates, params: Params | None) -> Updates:
        if params is None:
            return jax.tree.map(lambda g: self.f(g, None), grads)
        return jax.tree.map(self.f, grads, params)


def _check_callable(f: Any, name: str) -> None:
    if not callable(f):
        raise TypeError(f"{name}'s f must be callable, got {type(f).__name__}")


def stateless(f: Callable[[Updates, Params | None], Updates]) -> Stateless:
    """A transform from a function of the whole tree: ``u = f(g, params)``.

    ``params`` may be ``None``. The function is static: a new function object
    compiles again, the same one does not.
    """
    _check_callable(f, "stateless")
    return Stateless(f)


def stateless_with_tree_map(
    f: Callable[[Array, Array | None], Array],
) -> StatelessWithTreeMap:
    """A transform from a function of one leaf: ``u_i = f(g_i, params_i)``.

    Without parameters ``f`` is called with ``None`` as its second argument.
    """
    _check_callable(f, "stateless_with_tree_map")
    return StatelessWithTreeMap(f)


@jax.custom_vjp
def _scaled(inputs: PyTree, scale: Array) -> PyTree:
    del scale
    return inputs


def _scaled_fwd(inputs: PyTree, scale: Array) -> tuple[PyTree, Array]:
    return inputs, scale


def _scaled_bwd(scale: Array, cotangent: PyTree) -> tuple[PyTree, None]:
    return jax.tree.map(lambda c: c * scale.astype(c.dtype), cotangent), None


_scaled.defvjp(_scaled_fwd, _scaled_bwd)


def scale_gradient(inputs: PyTree, scale: ArrayLike) -> PyTree:
    """The identity on ``inputs`` whose backward pass multiplies by ``scale``.

    Forward ``y = x``; backward ``dL/dx = scale * dL/dy``. A concrete scale of
    1 returns ``inputs`` as they are and 0 stops the gradient.
    """
    if not isinstance(scale, jax.core.Tracer):
        value = np.asarray(scale)
        if value.shape != ():
            raise ValueError(f"scale must be a scalar, got shape {value.shape}")
        if value == 1.0:
            return inputs
        if value == 0.0:
            return jax.lax.stop_gradient(inputs)
    scale = jnp.asarray(scale)
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        scale = scale.astype(jnp.float32)
    return _scaled(inputs, scale)


class KeepParamsNonnegative(AbstractStatelessTransform):
    """Shorten the updates that would take a parameter below zero.

    ``u_i -> -p_i`` where ``p_i + u_i < 0``, else ``u_i``; so ``p + u >= 0``
    (a negative parameter is moved to 0).
    """

    def apply(self, grads: Updates, params: Params | None) -> Updates:
        if params is None:
            raise ValueError(
                "keep_params_nonnegative needs the parameters: call update(grads, "
                "state, params)"
            )

        def one(p, u):
            if p is None or u is None:
                return u
            return jnp.where(add(p, u) < 0, (-p).astype(u.dtype), u)

        return jax.tree.map(one, params, grads, is_leaf=lambda x: x is None)


def keep_params_nonnegative() -> KeepParamsNonnegative:
    """Keep ``params + updates >= 0``; put it last in a chain."""
    return KeepParamsNonnegative()
