"""Gradient accumulation: apply the inner optimizer once every k mini-steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, PyTree

from .._base import (
    AbstractTransform,
    Params,
    State,
    Updates,
    safe_increment,
    update_with_extra_args,
)
from .._interop import as_transform
from .._tree_math import canonical_dtype, cast_like, zeros_like

ShouldSkip = Callable[[Updates, Array, Params], tuple[Array, PyTree]]


def _steps_per_update(value: Any) -> Any:
    """``every_k_schedule``: a positive int (an int32 leaf) or a schedule."""
    if callable(value) or isinstance(value, jax.core.Tracer):
        return value
    array = np.asarray(value)
    if array.shape != () or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            "every_k_schedule must be a positive int or a function of the "
            f"gradient step, got {value!r}"
        )
    if array <= 0:
        raise ValueError(f"every_k_schedule must be >= 1, got {value!r}")
    return jnp.asarray(array, jnp.int32)


class MultiStepsState(eqx.Module):
    """``acc_grads`` mirrors the parameters, so a ZeRO plan partitions it."""

    mini_step: Array
    gradient_step: Array
    inner_opt_state: State
    acc_grads: Updates
    skip_state: PyTree = ()


class MultiSteps(AbstractTransform):
    """Accumulate ``k`` mini-steps of gradients, then take one inner step.

    Between updates the returned updates are zero; on every ``k``-th call the
    accumulated gradient (their running mean, ``acc += (g - acc) / (n + 1)``,
    or their sum with ``use_grad_mean=False``) goes to the inner transform.
    With a mean loss and equal mini-batches this is one step on the union of
    the mini-batches. ``k = every_k_schedule(gradient_step)`` may change over
    training (a growing batch size).

    The accumulator ``acc_grads`` is laid out like a moment: under a ZeRO plan
    it is partitioned over the data axes from stage 1 (optax's MultiSteps keeps
    a replicated one), and the update is plain array code, so it also runs
    inside ``shard_map`` on per-device shards. The inner step runs under
    ``lax.cond``: it costs nothing on the mini-steps in between.

    ``should_skip_update_fn(updates, gradient_step, params) -> (skip, info)``
    rejects a mini-step (the state is then left exactly as it was), e.g.
    ``shardopt.skip_not_finite``. Signature and numbers are optax's
    ``optax.MultiSteps``.

    Delayed updates as in Ott et al., "Scaling Neural Machine Translation",
    WMT 2018.
    """

    inner: AbstractTransform
    every_k_schedule: Any
    use_grad_mean: bool = eqx.field(static=True)
    should_skip_update_fn: ShouldSkip | None = eqx.field(static=True)
    accumulator_dtype: Any = eqx.field(static=True)
    takes_extra_args = True

    def __init__(
        self,
        opt: Any,
        every_k_schedule: int | Callable[[Array], Any],
        use_grad_mean: bool = True,
        should_skip_update_fn: ShouldSkip | None = None,
        accumulator_dtype: DTypeLike = jnp.float32,
    ):
        self.inner = as_transform(opt, "MultiSteps' opt")
        self.every_k_schedule = _steps_per_update(every_k_schedule)
        self.use_grad_mean = bool(use_grad_mean)
        self.should_skip_update_fn = should_skip_update_fn
        self.accumulator_dtype = canonical_dtype(accumulator_dtype, "accumulator_dtype")

    @property
    def inner_opt(self) -> AbstractTransform:
        """The wrapped transform (optax's name)."""
        return self.inner

    def gradient_transformation(self) -> MultiSteps:
        """This transform (optax's MultiSteps returns its init/update pair)."""
        return self

    def _k(self, gradient_step: Array) -> Array:
        k = self.every_k_schedule
        k = k(gradient_step) if callable(k) else k
        return jnp.asarray(k).astype(jnp.int32)

    def _skip(self, updates, gradient_step, params) -> tuple[Array, PyTree]:
        if self.should_skip_update_fn is None:
            return jnp.array(False), ()
        skip, info = self.should_skip_update_fn(updates, gradient_step, params)
        skip = jnp.asarray(skip)
        if (skip.dtype, skip.shape) != (jnp.bool_, ()):
            raise ValueError(
                "should_skip_update_fn must return a boolean scalar array, got "
                f"{skip.dtype}[{','.join(map(str, skip.shape))}]"
            )
        return skip, info

    def init(self, params: Params) -> MultiStepsState:
        step = jnp.zeros([], jnp.int32)
        _, skip_state = self._skip(zeros_like(params), step, params)
        return MultiStepsState(
            mini_step=jnp.zeros([], jnp.int32),
            gradient_step=step,
            inner_opt_state=self.inner.init(params),
            acc_grads=zeros_like(params, self.accumulator_dtype),
            skip_state=skip_state,
        )

    def update(
        self,
        grads: Updates,
        state: MultiStepsState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, MultiStepsState]:
        k = self._k(state.gradient_step)
        skip, skip_state = self._skip(grads, state.gradient_step, params)
        n = state.mini_step

        def accumulate(g, acc):
            g = g.astype(acc.dtype)
            if self.use_grad_mean:  # Welford's running mean
                return acc + (g - acc) / (n + 1).astype(acc.dtype)
            return acc + g

        acc = jax.tree.map(accumulate, grads, state.acc_grads)
        emit = n == k - 1

        def inner_step(inner_state):
            return update_with_extra_args(
                self.inner, cast_like(acc, grads), inner_state, params, extra_args
            )

        def hold(inner_state):
            # zeros made from the gradients keep their per-device (varying)
            # type inside shard_map, as both branches of a cond must
            shapes = jax.eval_shape(inner_step, inner_state)[0]
            zeros = jax.tree.map(
                lambda s, g: jnp.zeros_like(g, dtype=s.dtype), shapes, grads
            )
            return zeros, inner_state

        updates, inner_state = jax.lax.cond(
            emit, inner_step, hold, state.inner_opt_state
        )
        taken = MultiStepsState(
            mini_step=safe_increment(n) % k,
            gradient_step=jnp.where(
                emit, safe_increment(state.gradient_step), state.gradient_step
            ),
            inner_opt_state=inner_state,
            acc_grads=jax.tree.map(
                lambda a: jnp.where(emit, jnp.zeros_like(a), a), acc
            ),
            skip_state=skip_state,
        )
        if self.should_skip_update_fn is None:
            return updates, taken
        # a rejected mini-step leaves every leaf of the state as it was
        skipped = eqx.tree_at(lambda s: s.skip_state, state, skip_state)
        new_state = jax.tree.map(lambda t, s: jnp.where(skip, s, t), taken, skipped)
        updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), updates)
        return updates, new_state

    def has_updated(self, state: MultiStepsState) -> Array:
        """True right after a step in which the inner transform was applied."""
        return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)
