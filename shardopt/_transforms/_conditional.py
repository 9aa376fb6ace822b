"""Transforms that run their inner transform only on some steps.

``conditionally_mask`` and ``conditionally_transform`` ask a function of the
step counter; ``apply_every`` accumulates updates and emits them every ``k``
steps; ``periodic_update`` (a function, not a transform) copies new values
into a slow copy every ``update_period`` steps. Whenever an inner transform is
not run, its state is returned as it came in, bit for bit (``jax.lax.cond``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike, PyTree

from .._base import (
    AbstractTransform,
    Params,
    State,
    Updates,
    safe_increment,
    update_with_extra_args,
    zero_count,
)
from .._interop import as_transform
from .._tree_math import add, canonical_dtype, widened, zeros_like

ConditionFn = Callable[..., ArrayLike]


def check_int(value: Any, name: str, low: int) -> int:
    """``value`` as a Python int ``>= low``; raises naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def check_callable(value: Any, name: str) -> Callable:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def run_if(
    pred: Array,
    inner: AbstractTransform,
    grads: Updates,
    state: State,
    params: Params | None,
    extra_args: dict[str, Any],
    otherwise: Literal["zeros", "pass"],
) -> tuple[Updates, State]:
    """``inner``'s update where ``pred`` holds; else ``state`` exactly as it was.

    When skipped the updates are zeros (``otherwise="zeros"``) or ``grads``
    themselves (``"pass"``), in the dtypes the inner transform would have
    returned, so that both branches of the ``jax.lax.cond`` agree.
    """

    def run(_):
        return update_with_extra_args(inner, grads, state, params, extra_args)

    shapes, _ = jax.eval_shape(run, None)

    def skip(_):
        if otherwise == "zeros":
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), state
        try:
            passed = jax.tree.map(lambda g, s: g.astype(s.dtype), grads, shapes)
        except ValueError as err:
            raise ValueError(
                "conditionally_transform passes the updates through on skipped "
                "steps, so its inner transform must return updates shaped like "
                f"its input: {err}"
            ) from err
        return passed, state

    return jax.lax.cond(pred, run, skip, None)


def _condition(fn: ConditionFn, step: Array, kwargs: dict[str, Any]) -> Array:
    out = jnp.asarray(fn(step, **kwargs))
    if out.shape != ():
        raise ValueError(
            f"should_transform_fn must return a scalar, got shape {out.shape}"
        )
    return out if out.dtype == jnp.bool_ else out != 0


class ConditionallyTransformState(eqx.Module):
    inner_state: State
    step: Array


class ConditionallyTransform(AbstractTransform):
    """Run ``inner`` when ``should_transform_fn(step)`` is True; else pass through.

    On other steps the updates are returned unchanged and the inner state is
    kept exactly. ``step`` counts the calls to ``update`` made before this one.
    """

    inner: AbstractTransform
    should_transform_fn: ConditionFn = eqx.field(static=True)
    forward_extra_args: bool = eqx.field(static=True)
    takes_extra_args = True

    def init(self, params: Params) -> ConditionallyTransformState:
        return ConditionallyTransformState(self.inner.init(params), zero_count())

    def update(
        self,
        grads: Updates,
        state: ConditionallyTransformState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, ConditionallyTransformState]:
        kwargs = extra_args if self.forward_extra_args else {}
        pred = _condition(self.should_transform_fn, state.step, kwargs)
        updates, inner_state = run_if(
            pred, self.inner, grads, state.inner_state, params, extra_args, "pass"
        )
        return updates, ConditionallyTransformState(
            inner_state, safe_increment(state.step)
        )


class ConditionallyMaskState(eqx.Module):
    step: Array
    inner_state: State


class ConditionallyMask(AbstractTransform):
    """Run ``inner`` when ``should_transform_fn(step)`` is True; else zero updates.

    On other steps the updates are zeros and the inner state is kept exactly.
    """

    inner: AbstractTransform
    should_transform_fn: ConditionFn = eqx.field(static=True)
    forward_extra_args: bool = eqx.field(static=True)
    takes_extra_args = True

    def init(self, params: Params) -> ConditionallyMaskState:
        return ConditionallyMaskState(zero_count(), self.inner.init(params))

    def update(
        self,
        grads: Updates,
        state: ConditionallyMaskState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, ConditionallyMaskState]:
        kwargs = extra_args if self.forward_extra_args else {}
        pred = _condition(self.should_transform_fn, state.step, kwargs)
        updates, inner_state = run_if(
            pred, self.inner, grads, state.inner_state, params, extra_args, "zeros"
        )
        return updates, ConditionallyMaskState(safe_increment(state.step), inner_state)


def conditionally_transform(
    inner: Any, should_transform_fn: ConditionFn, forward_extra_args: bool = False
) -> ConditionallyTransform:
    """Apply ``inner`` (shardopt or optax) only where ``should_transform_fn(step)``.

    ``should_transform_fn(step, **extra_args)`` gets the number of earlier calls
    (int32) and returns a scalar bool; the extra arguments (``value=``, ...)
    reach it only with ``forward_extra_args=True``. Skipped steps return the
    updates unchanged and leave the inner state untouched.
    """
    return ConditionallyTransform(
        as_transform(inner, "conditionally_transform's inner transform"),
        check_callable(should_transform_fn, "should_transform_fn"),
        check_bool(forward_extra_args, "forward_extra_args"),
    )


def conditionally_mask(
    inner: Any, should_transform_fn: ConditionFn, forward_extra_args: bool = False
) -> ConditionallyMask:
    """Apply ``inner`` only where ``should_transform_fn(step)``; zeros elsewhere.

    As :func:`conditionally_transform`, except that skipped steps return zero
    updates (the parameters stay where they are).
    """
    return ConditionallyMask(
        as_transform(inner, "conditionally_mask's inner transform"),
        check_callable(should_transform_fn, "should_transform_fn"),
        check_bool(forward_extra_args, "forward_extra_args"),
    )


class ApplyEveryState(eqx.Module):
    count: Array  # steps since the last emission: in [0, k)
    grad_acc: Updates


class ApplyEvery(AbstractTransform):
    """Sum the updates over ``k`` steps; emit the sum on the k-th, zeros before.

    With ``c = count mod k``: ``acc = g + (acc if c != 0 else 0)`` and the
    update is ``acc`` when ``c == k - 1``, else 0. Transforms chained before
    this one still update their state on every step (unlike optax.MultiSteps).
    ``accumulator_dtype`` stores the sum (default: each parameter's dtype): it
    is summed in float32, emitted unrounded and rounded once when stored.
    """

    k: int = eqx.field(static=True)
    accumulator_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ApplyEveryState:
        return ApplyEveryState(zero_count(), zeros_like(params, self.accumulator_dtype))

    def update(
        self, grads: Updates, state: ApplyEveryState, params: Params | None = None
    ) -> tuple[Updates, ApplyEveryState]:
        del params
        phase = state.count % self.k
        keep, emit = phase != 0, phase == self.k - 1

        def accumulate(g, acc):
            total = add(acc, g)
            return jnp.where(keep, total, g.astype(total.dtype))

        acc = jax.tree.map(
            accumulate,
            widened(grads, self.accumulator_dtype),
            widened(state.grad_acc, self.accumulator_dtype),
        )
        updates = jax.tree.map(lambda a: jnp.where(emit, a, jnp.zeros_like(a)), acc)
        acc = jax.tree.map(lambda a, old: a.astype(old.dtype), acc, state.grad_acc)
        count = safe_increment(state.count) % self.k
        return updates, ApplyEveryState(count, acc)


def apply_every(
    k: int = 1, *, accumulator_dtype: DTypeLike | None = None
) -> ApplyEvery:
    """Accumulate updates and apply their sum every ``k`` steps (``k >= 1``).

    ``accumulator_dtype``: the dtype the sum is stored in (default: each
    parameter's); a non-floating dtype is an error.
    """
    return ApplyEvery(
        check_int(k, "k", 1), canonical_dtype(accumulator_dtype, "accumulator_dtype")
    )


def periodic_update(
    new_tensors: PyTree,
    old_tensors: PyTree,
    steps: ArrayLike,
    update_period: ArrayLike,
) -> PyTree:
    """``new_tensors`` when ``steps % update_period == 0``, else ``old_tensors``.

    The slow "target" copy of a network, refreshed every ``update_period``
    online steps. Mnih et al., "Human-level control through deep reinforcement
    learning", Nature 2015; Grill et al., "Bootstrap Your Own Latent", NeurIPS
    2020.
    """
    steps = jnp.asarray(steps)
    period = jnp.asarray(update_period, steps.dtype)
    return jax.lax.cond(steps % period == 0, lambda: new_tensors, lambda: old_tensors)
