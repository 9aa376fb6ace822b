"""Lookahead: k steps of a fast optimizer, then one step of the slow weights.

The parameters are a pair, :class:`LookaheadParams` ``(fast, slow)``; the fast
optimizer sees only the fast ones. Every ``sync_period`` steps the slow
weights move toward the fast ones, ``slow += alpha * (fast - slow)``, and the
fast ones restart from there.

With :class:`shardopt.Optimizer`, the pair *is* the parameter tree::

    params = shardopt.LookaheadParams.init_synced(model)
    opt = shardopt.Optimizer(shardopt.lookahead(shardopt.adam(1e-3), 5, 0.5), params)

    @eqx.filter_jit
    def train_step(params, opt, x, y):
        # the gradient of the loss at the fast weights; the slow half is ignored
        grads = eqx.filter_grad(lambda p: loss(p.fast, x, y))(params)
        return opt.step(params, grads)

Evaluate with ``params.slow``. The updates must be applied as returned (as
``opt.step`` and ``optax.apply_updates`` do), or the pair falls out of sync.
"""

from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._base import (
    AbstractTransform,
    Params,
    State,
    Updates,
    safe_increment,
    update_with_extra_args,
    zero_count,
)
from .._hyperparams import (
    CLOSED_UNIT_INTERVAL,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._interop import as_transform
from .._tree_math import add, promote
from ._conditional import check_bool, check_int


def _copy(x: Any) -> Any:
    return jnp.copy(x) if isinstance(x, jax.Array) else x


class LookaheadParams(eqx.Module):
    """The two sets of weights of lookahead: ``fast`` (for gradients) and ``slow``.

    Compute gradients at ``fast``; evaluate with ``slow``, which generalises
    better (Zhang et al., 2019). optax's ``LookaheadParams`` works as well.
    """

    fast: Params
    slow: Params

    @classmethod
    def init_synced(cls, params: Params) -> LookaheadParams:
        """Both halves equal to ``params``; the slow one a copy in its own buffers.

        Separate buffers let a training step donate the pair.
        """
        return cls(fast=params, slow=jax.tree.map(_copy, params))


def _is_pair(tree: Any) -> bool:
    return hasattr(tree, "fast") and hasattr(tree, "slow")


class LookaheadState(eqx.Module):
    # the ZeRO plan places the fast optimizer's state like the ``fast`` half
    param_subtrees: ClassVar = {"fast_state": (jax.tree_util.GetAttrKey("fast"),)}

    count: Array
    fast_state: State
    steps_since_sync: Array


class Lookahead(AbstractTransform):
    """Lookahead around ``fast_optimizer``; updates are a ``LookaheadParams`` pair.

    With ``u`` the fast optimizer's update and ``d = fast + u - slow``: on the
    last step of a period the slow update is ``alpha * d`` and the fast update
    ``u - (1 - alpha) * d`` (both land on ``slow + alpha * d``); on the other
    steps they are ``0`` and ``u``. Zhang, Lucas, Hinton & Ba, "Lookahead
    Optimizer: k steps forward, 1 step back", NeurIPS 2019.
    """

    fast_optimizer: AbstractTransform
    sync_period: int = eqx.field(static=True)
    slow_step_size: Hyperparameter = hyperparameter(
        "slow_step_size", CLOSED_UNIT_INTERVAL
    )
    reset_state: bool = eqx.field(static=True)
    takes_extra_args = True

    def init(self, params: Params) -> LookaheadState:
        # optax accepts the fast parameters alone here too
        fast = params.fast if _is_pair(params) else params
        return LookaheadState(
            zero_count(), self.fast_optimizer.init(fast), zero_count()
        )

    def update(
        self,
        grads: Updates,
        state: LookaheadState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, LookaheadState]:
        if not _is_pair(params):
            raise ValueError(
                "lookahead needs the parameters as a LookaheadParams pair (fast and "
                "slow), e.g. shardopt.LookaheadParams.init_synced(params); got "
                f"{type(params).__name__}"
            )
        # Optimizer.step hands gradients shaped like the pair: use the fast half
        fast_grads = grads.fast if _is_pair(grads) else grads
        updates, fast_state = update_with_extra_args(
            self.fast_optimizer,
            fast_grads,
            state.fast_state,
            params.fast,
            extra_args,
        )
        sync = state.steps_since_sync == self.sync_period - 1
        alpha = resolve(self.slow_step_size, state.count, name="slow_step_size")
        zero = jnp.zeros([], alpha.dtype)
        slow_factor = jnp.where(sync, alpha, zero)
        fast_factor = jnp.where(sync, 1 - alpha, zero)

        def difference(f, u, s):
            reached, s = promote(add(f, u), s)
            return reached - s

        diff = jax.tree.map(difference, params.fast, updates, params.slow)
        slow_updates = jax.tree.map(lambda d: slow_factor.astype(d.dtype) * d, diff)

        def fast_update(u, d):
            u, pull = promote(u, fast_factor.astype(d.dtype) * d)
            return u - pull

        fast_updates = jax.tree.map(fast_update, updates, diff)
        if self.reset_state:
            fresh = self.fast_optimizer.init(params.fast)
            fast_state = jax.tree.map(
                lambda new, old: jnp.where(sync, new, old).astype(old.dtype),
                fresh,
                fast_state,
            )
        pair = type(params)(fast=fast_updates, slow=slow_updates)
        steps = safe_increment(state.steps_since_sync) % self.sync_period
        return pair, LookaheadState(safe_increment(state.count), fast_state, steps)


def lookahead(
    fast_optimizer: Any,
    sync_period: int,
    slow_step_size: ScalarOrSchedule,
    reset_state: bool = False,
) -> Lookahead:
    """Lookahead: ``sync_period`` fast steps, then pull the slow weights along.

    ``fast_optimizer`` is a shardopt or optax transform; the parameters are a
    :class:`LookaheadParams` pair and the gradients are taken at ``fast``
    (given as a tree like ``fast`` or, as ``Optimizer.step`` requires, as a
    pair whose ``slow`` half is ignored). ``reset_state`` re-initialises the
    fast optimizer's state at every synchronisation.
    """
    return Lookahead(
        as_transform(fast_optimizer, "lookahead's fast_optimizer"),
        check_int(sync_period, "sync_period", 1),
        slow_step_size,
        check_bool(reset_state, "reset_state"),
    )
