"""Schedule-Free: momentum replaced by interpolation and averaging.

The wrapped optimizer steps a sequence ``z``; the parameters the loop holds
are ``y``, where gradients are taken; the sequence to evaluate, ``x``, is an
average of the ``z`` and is recovered from the other two on the fly
(:func:`schedule_free_eval_params`). Only ``z`` is kept, so the memory is the
base optimizer's plus one copy of the parameters, laid out like them by the
ZeRO plan.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._base import (
    AbstractTransform,
    Params,
    State,
    Updates,
    safe_increment,
    update_with_extra_args,
)
from .._hyperparams import (
    NONNEGATIVE,
    REAL,
    Domain,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._interop import as_transform
from .._tree_math import canonical_dtype, lowest_dtype, promote

UNIT_OPEN_CLOSED = Domain(low=0.0, high=1.0, low_open=True, text="in (0, 1]")


class ScheduleFreeState(eqx.Module):
    """State of :func:`schedule_free`, with optax's field names.

    ``b1``, ``weight_sum`` and ``max_lr`` are scalars in the parameters'
    lowest dtype (as in optax); ``z`` is the base optimizer's sequence.
    """

    b1: Array
    weight_sum: Array
    step_count: Array
    max_lr: Array
    base_optimizer_state: State
    z: Params


def _mul(a: Array, b: Array) -> Array:
    a, b = promote(a, b)
    return a * b


def _sub(a: Array, b: Array) -> Array:
    a, b = promote(a, b)
    return a - b


def _add(a: Array, b: Array) -> Array:
    a, b = promote(a, b)
    return a + b


class ScheduleFree(AbstractTransform):
    r"""Schedule-Free wrapper around ``base_optimizer`` (run without momentum).

    With ``c_t = lr_max^p / \sum_{s \le t} lr_max^p``:
    ``z_{t+1} = z_t + u_t`` (``u_t`` the base update at ``y_t``),
    ``x_{t+1} = (1 - c_t) x_t + c_t z_{t+1}``,
    ``y_{t+1} = b1 x_{t+1} + (1 - b1) z_{t+1}``; the update is ``y_{t+1} - y_t``
    and ``x_t = (y_t - (1 - b1) z_t) / b1`` is recomputed, not stored.

    Defazio et al., "The Road Less Scheduled", NeurIPS 2024.
    """

    base_optimizer: AbstractTransform
    learning_rate: Hyperparameter = hyperparameter("learning_rate", NONNEGATIVE)
    b1: Hyperparameter = hyperparameter("b1", UNIT_OPEN_CLOSED)
    weight_lr_power: Hyperparameter = hyperparameter("weight_lr_power", REAL)
    state_dtype: jnp.dtype | None = eqx.field(static=True)
    takes_extra_args = True

    def init(self, params: Params) -> ScheduleFreeState:
        dtype = lowest_dtype(params)
        z = jax.tree.map(
            # a buffer of its own, so that z and the parameters can both be donated
            lambda p: jnp.array(p, dtype=self.state_dtype or p.dtype, copy=True),
            params,
        )
        return ScheduleFreeState(
            b1=jnp.asarray(self.b1).astype(dtype),
            weight_sum=jnp.zeros([], dtype),
            step_count=jnp.ones([], jnp.int32),
            max_lr=jnp.zeros([], dtype),
            base_optimizer_state=self.base_optimizer.init(params),
            z=z,
        )

    def update(
        self,
        grads: Updates,
        state: ScheduleFreeState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, ScheduleFreeState]:
        if params is None:
            raise ValueError("schedule_free needs the parameters: update(g, s, params)")
        dtype = state.max_lr.dtype
        lr = resolve(self.learning_rate, state.step_count, name="learning_rate")
        max_lr = jnp.maximum(state.max_lr, lr.astype(dtype))
        power = resolve(self.weight_lr_power, state.step_count, name="weight_lr_power")
        weight = max_lr ** power.astype(dtype)
        total = state.weight_sum + weight
        ck = jnp.where(
            jnp.isnan(weight) | jnp.isnan(total),
            jnp.full(weight.shape, jnp.nan, dtype),
            jnp.nan_to_num(weight / total, nan=0.0, posinf=jnp.inf),
        )
        base_updates, base_state = update_with_extra_args(
            self.base_optimizer, grads, state.base_optimizer_state, params, extra_args
        )
        z = jax.tree.map(lambda z, u: _add(z, u).astype(z.dtype), state.z, base_updates)
        b1 = jnp.asarray(self.b1)

        def new_y(y, z_old, z_new):
            x = _div(_sub(y, (1 - b1).astype(z_old.dtype) * z_old), b1)
            x = _add(_mul(1 - ck, x), _mul(ck, z_new))
            y_new = _add(b1.astype(x.dtype) * x, (1 - b1).astype(z_new.dtype) * z_new)
            return _sub(y_new, y)

        updates = jax.tree.map(new_y, params, state.z, z)
        return updates, ScheduleFreeState(
            b1=state.b1,
            weight_sum=total,
            step_count=safe_increment(state.step_count),
            max_lr=max_lr,
            base_optimizer_state=base_state,
            z=z,
        )


def _div(a: Array, b1: Array) -> Array:
    return a / b1.astype(a.dtype)


def schedule_free(
    base_optimizer: Any,
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    weight_lr_power: float = 2.0,
    state_dtype: jnp.dtype | str | None = None,
) -> ScheduleFree:
    """Make ``base_optimizer`` (shardopt or optax, without momentum) schedule-free.

    ``learning_rate`` is the base optimizer's (a constant or a warmup schedule,
    read at ``step_count = 1, 2, ...``): it weighs the average as
    ``max_lr ** weight_lr_power``. ``b1`` in (0, 1] interpolates between the
    average and ``z``; ``state_dtype`` is the dtype of ``z``. Evaluate with
    :func:`schedule_free_eval_params`. Defazio et al., "The Road Less
    Scheduled", NeurIPS 2024.
    """
    if callable(b1):
        raise TypeError("schedule_free's b1 must be a number, not a schedule")
    return ScheduleFree(
        as_transform(base_optimizer, "schedule_free's base_optimizer"),
        learning_rate,
        b1,
        weight_lr_power,
        canonical_dtype(state_dtype, "state_dtype"),
    )


def _find_state(state: Any) -> Any:
    if hasattr(state, "b1") and hasattr(state, "z"):
        return state
    inner = getattr(state, "state", None)  # an Optimizer
    if inner is not None and not isinstance(inner, jax.Array):
        return _find_state(inner)
    is_sf = lambda x: hasattr(x, "b1") and hasattr(x, "z")
    found = [x for x in jax.tree.leaves(state, is_leaf=is_sf) if is_sf(x)]
    if len(found) != 1:
        raise ValueError(
            "schedule_free_eval_params needs the state of schedule_free (a "
            f"ScheduleFreeState, or a state or Optimizer holding exactly one); "
            f"found {len(found)} in {type(state).__name__}"
        )
    return found[0]


def schedule_free_eval_params(state: Any, params: Params) -> PyTree:
    """The parameters to evaluate schedule-free training at: ``x``.

    ``x = (y - (1 - b1) z) / b1`` with ``y = params`` and ``b1``, ``z`` from the
    state. ``state`` is a ``ScheduleFreeState`` (shardopt's or optax's), a
    state containing one (a chain's), or the :class:`~shardopt.Optimizer`
    itself. Leaves that are not trained (``None`` in ``z``) pass through.
    """
    found = _find_state(state)
    b1 = jnp.asarray(found.b1)

    def one(z, y):
        if z is None:
            return y
        return _div(_sub(y, _mul(1 - b1, z)), b1)

    return jax.tree.map(one, found.z, params, is_leaf=lambda x: x is None)
