"""Complex parameters as pairs of real ones, for optimizers written for reals.

Each complex leaf becomes a :class:`SplitRealAndImaginaryArrays` pair before
the inner transform sees it, and the pair of updates becomes one complex
update after. The inner state then holds real arrays only. JAX's gradient
of a real loss with respect to a complex parameter is the conjugate of the
steepest-ascent direction: conjugate it before the optimizer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._base import AbstractTransform, Params, State, Updates
from .._interop import as_transform


class SplitRealAndImaginaryArrays(NamedTuple):
    """The real and imaginary parts of one complex array, as two real arrays."""

    real: Array
    imaginary: Array


def _split(x: Any) -> Any:
    if x is not None and jnp.iscomplexobj(x):
        return SplitRealAndImaginaryArrays(x.real, x.imag)
    return x


def _merge(x: Any) -> Any:
    if isinstance(x, SplitRealAndImaginaryArrays):
        # optax's arithmetic, so that the numbers (signed zeros too) agree
        with jax.numpy_dtype_promotion("standard"):
            return x.real + x.imaginary * 1j
    return x


def _split_tree(tree: Any) -> Any:
    return jax.tree.map(_split, tree, is_leaf=lambda x: x is None)


class SplitRealAndImaginaryState(eqx.Module):
    """State of :func:`split_real_and_imaginary`: the inner transform's state."""

    inner_state: State


class SplitRealAndImaginary(AbstractTransform):
    """Run ``inner`` on complex leaves split as ``(real, imaginary)`` pairs.

    For ``z = x + iy`` the inner transform sees ``x`` and ``y`` as two real
    parameters, and the update is ``u_x + i u_y``. Real leaves pass through to
    ``inner`` unchanged.
    """

    inner: AbstractTransform

    def init(self, params: Params) -> SplitRealAndImaginaryState:
        return SplitRealAndImaginaryState(self.inner.init(_split_tree(params)))

    def update(
        self,
        grads: Updates,
        state: SplitRealAndImaginaryState,
        params: Params | None = None,
    ) -> tuple[Updates, SplitRealAndImaginaryState]:
        split_params = None if params is None else _split_tree(params)
        updates, inner_state = self.inner.update(
            _split_tree(grads), state.inner_state, split_params
        )
        merged = jax.tree.map(
            _merge,
            updates,
            is_leaf=lambda x: isinstance(x, SplitRealAndImaginaryArrays),
        )
        return merged, SplitRealAndImaginaryState(inner_state)


def split_real_and_imaginary(inner: Any) -> SplitRealAndImaginary:
    """Optimize complex parameters as pairs of real ones with ``inner``.

    ``inner`` is a shardopt or optax transform. Useful for optimizers whose
    statistics assume real numbers (Adam's second moment of ``g * g`` is not
    ``|g|^2`` for complex ``g``). See optax issue #196 for the conjugation
    convention.
    """
    return SplitRealAndImaginary(as_transform(inner, "split_real_and_imaginary"))
