"""Guards against non-finite updates: skip the step, or zero the NaNs.

``apply_if_finite`` wraps a transform and skips every step whose updates hold
a NaN or an infinity, leaving the inner state exactly as it was (up to
``max_consecutive_errors`` steps in a row). ``zero_nans`` replaces NaNs by 0.
``skip_not_finite`` and ``skip_large_updates`` are optax's predicates for
``MultiSteps(..., should_skip_update_fn=...)`` (optax's or shardopt's):
functions, not transforms.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree

from .._base import (
    AbstractTransform,
    Params,
    State,
    Updates,
    safe_increment,
    zero_count,
)
from .._interop import as_transform
from .._tree_math import promote
from ._conditional import check_int, run_if


def all_finite(tree: PyTree) -> Array:
    """True iff no leaf of ``tree`` holds a NaN or an infinity (True for none)."""
    finite = jnp.array(True)
    for leaf in jax.tree.leaves(tree):
        finite = jnp.logical_and(finite, jnp.all(jnp.isfinite(leaf)))
    return finite


class ApplyIfFiniteState(eqx.Module):
    """``notfinite_count``: non-finite steps in a row (reset by a finite one);
    ``last_finite``: whether the last step was finite; ``total_notfinite``:
    all non-finite steps so far; ``inner_state``: the wrapped transform's."""

    notfinite_count: Array
    last_finite: Array
    total_notfinite: Array
    inner_state: State


class ApplyIfFinite(AbstractTransform):
    """Run ``inner`` only on finite updates; skip (zero updates) the others.

    A step whose updates hold a NaN or an infinity returns zeros and keeps the
    inner state bit for bit, unless it is the ``max_consecutive_errors + 1``-th
    such step in a row: then the inner update is applied anyway.
    """

    inner: AbstractTransform
    max_consecutive_errors: int = eqx.field(static=True)
    takes_extra_args = True

    def init(self, params: Params) -> ApplyIfFiniteState:
        return ApplyIfFiniteState(
            zero_count(), jnp.array(True), zero_count(), self.inner.init(params)
        )

    def update(
        self,
        grads: Updates,
        state: ApplyIfFiniteState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, ApplyIfFiniteState]:
        finite = all_finite(grads)
        in_a_row = jnp.where(
            finite, zero_count(), safe_increment(state.notfinite_count)
        )
        apply = jnp.logical_or(finite, in_a_row > self.max_consecutive_errors)
        updates, inner_state = run_if(
            apply, self.inner, grads, state.inner_state, params, extra_args, "zeros"
        )
        total = jnp.where(
            finite, state.total_notfinite, safe_increment(state.total_notfinite)
        )
        return updates, ApplyIfFiniteState(in_a_row, finite, total, inner_state)


def apply_if_finite(inner: Any, max_consecutive_errors: int) -> ApplyIfFinite:
    """Skip the steps whose updates are not finite (NaN or inf), up to a limit.

    ``inner`` is a shardopt or an optax transform. A skipped step returns zero
    updates and leaves the inner state untouched; after
    ``max_consecutive_errors`` skipped steps in a row the next non-finite one
    is applied.
    """
    return ApplyIfFinite(
        as_transform(inner, "apply_if_finite's inner transform"),
        check_int(max_consecutive_errors, "max_consecutive_errors", 0),
    )


class ZeroNansState(eqx.Module):
    """Per parameter, a bool scalar: whether the last updates held a NaN there."""

    found_nan: PyTree


class ZeroNans(AbstractTransform):
    """Replace every NaN in the updates by 0 (infinities are kept)."""

    def init(self, params: Params) -> ZeroNansState:
        return ZeroNansState(jax.tree.map(lambda _: jnp.array(False), params))

    def update(
        self, grads: Updates, state: ZeroNansState, params: Params | None = None
    ) -> tuple[Updates, ZeroNansState]:
        del params, state
        found = jax.tree.map(lambda g: jnp.any(jnp.isnan(g)), grads)
        updates = jax.tree.map(
            lambda g: jnp.where(jnp.isnan(g), jnp.zeros_like(g), g), grads
        )
        return updates, ZeroNansState(found)


def zero_nans() -> ZeroNans:
    """Zero the NaNs of the updates; the state records where any were found."""
    return ZeroNans()


def skip_not_finite(
    updates: Updates, gradient_step: ArrayLike, params: Params | None
) -> tuple[Array, dict[str, Array]]:
    """optax.MultiSteps predicate: skip iff an update holds a NaN or an infinity.

    Returns ``(should_skip, {"should_skip": ..., "num_not_finite": ...})``, the
    second the number of non-finite values (int32).
    """
    del gradient_step, params
    count = jnp.zeros([], jnp.int32)
    for leaf in jax.tree.leaves(updates):
        count = count + jnp.sum(~jnp.isfinite(leaf)).astype(jnp.int32)
    should_skip = count > 0
    return should_skip, {"should_skip": should_skip, "num_not_finite": count}


def skip_large_updates(
    updates: Updates,
    gradient_step: ArrayLike,
    params: Params | None,
    max_squared_norm: ArrayLike,
) -> tuple[Array, dict[str, Array]]:
    """optax.MultiSteps predicate: skip unless ``sum_i ||u_i||^2 < max_squared_norm``.

    A NaN norm is skipped too. Bind the bound first:
    ``functools.partial(skip_large_updates, max_squared_norm=...)``. Returns
    ``(should_skip, {"should_skip": ..., "norm_squared": ...})``.
    """
    del gradient_step, params
    sums = [jnp.sum(leaf**2) for leaf in jax.tree.leaves(updates)]
    empty = jnp.zeros([], jnp.float32)
    norm_sq = jnp.sum(jnp.stack(promote(*sums))) if sums else empty
    floating = jnp.issubdtype(norm_sq.dtype, jnp.floating)
    if floating and isinstance(max_squared_norm, (int, float)):
        # a Python number takes the norm's dtype, as JAX's weak typing does
        bound = jnp.asarray(max_squared_norm, norm_sq.dtype)
    else:
        norm_sq, bound = promote(norm_sq, jnp.asarray(max_squared_norm))
    should_skip = jnp.logical_not(norm_sq < bound)
    return should_skip, {"should_skip": should_skip, "norm_squared": norm_sq}
