"""Sharpness-Aware Minimization: adversarial steps, then one outer step.

``sam(optimizer, adv_optimizer, sync_period)`` runs ``sync_period - 1``
adversarial steps (``adv_optimizer``, e.g. normalized gradient ascent) from
the current weights, then one step of ``optimizer`` taken from where the
adversarial steps started, with the gradient at where they ended. The
starting weights are cached in the state (a mirror of the parameters, laid
out like them by the ZeRO plan); in opaque mode the adversarial steps run
inside one ``update`` and nothing is cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._base import (
    AbstractTransform,
    Params,
    State,
    Updates,
    apply_updates,
    zero_count,
)
from .._interop import as_transform
from .._tree_math import copied, promote
from ._conditional import check_bool, check_int

GradFn = Callable[[Params, int], Updates]


class SAMState(eqx.Module):
    """State of :func:`sam`, with optax's field names.

    ``steps_since_sync`` counts adversarial steps since the last outer one;
    ``cache`` holds the weights the adversarial steps started from (``None``
    in opaque mode).
    """

    steps_since_sync: Array
    opt_state: State
    adv_state: State
    cache: Params | None


def _pick(pred: Array, if_true: Any, if_false: Any) -> Any:
    """``pred * if_true + (1 - pred) * if_false``, leaf by leaf, as optax picks.

    Arithmetic rather than ``jnp.where`` so that XLA fuses (and, for bfloat16,
    rounds) it as it does optax's; the two agree on every finite value.
    """

    def one(t, f):
        t, f = jnp.asarray(t), jnp.asarray(f)
        a = pred.astype(t.dtype) * t
        b = (1 - pred.astype(jnp.int32)).astype(f.dtype) * f
        a, b = promote(a, b)
        return a + b

    return jax.tree.map(one, if_true, if_false)


def _cast_like(tree: Any, like: Any) -> Any:
    return jax.tree.map(lambda x, old: jnp.asarray(x).astype(old.dtype), tree, like)


def _negate(tree: Updates) -> Updates:
    return jax.tree.map(lambda x: -x, tree)


class SAM(AbstractTransform):
    """SAM around an outer ``optimizer`` and an adversarial ``adv_optimizer``.

    Transparent mode, one call per step: on steps ``0 .. k-2`` of a period the
    update is ``-adv_optimizer(g)`` (ascent; step 0 caches the weights ``w``);
    on step ``k-1`` it is ``w - x + optimizer(g; w)``, which lands on the outer
    step from ``w`` with the gradient ``g`` taken at the perturbed ``x``.
    Opaque mode runs the ``k - 1`` ascent steps inside one call, asking
    ``grad_fn(params, i)`` for each gradient. Foret et al.,
    "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021.
    """

    optimizer: AbstractTransform
    adv_optimizer: AbstractTransform
    sync_period: int = eqx.field(static=True)
    reset_state: bool = eqx.field(static=True)
    opaque_mode: bool = eqx.field(static=True)
    batch_axis_name: str | None = eqx.field(static=True)
    takes_extra_args = True

    def init(self, params: Params) -> SAMState:
        return SAMState(
            steps_since_sync=zero_count(),
            opt_state=self.optimizer.init(params),
            adv_state=self.adv_optimizer.init(params),
            cache=None if self.opaque_mode else copied(params),
        )

    def update(
        self,
        grads: Updates,
        state: SAMState,
        params: Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, SAMState]:
        del extra_args  # as optax: the inner optimizers get none
        if params is None:
            raise ValueError("sam needs the parameters: update(g, s, params)")
        if self.opaque_mode:
            return self._opaque(grads, state, params, grad_fn)
        first = state.steps_since_sync == 0
        last = state.steps_since_sync == self.sync_period - 1
        adv_updates, adv_state = self.adv_optimizer.update(
            grads, state.adv_state, params
        )
        adv_updates = _negate(adv_updates)
        opt_updates, opt_state = self.optimizer.update(
            grads, state.opt_state, state.cache
        )

        def outer(c, p, u):
            c, p = promote(c, p)
            back, u = promote(c - p, u)
            return back + u

        opt_updates = jax.tree.map(outer, state.cache, params, opt_updates)
        cache = _pick(first, params, state.cache)
        updates = _pick(last, opt_updates, adv_updates)
        if self.reset_state:
            adv_state = _pick(last, self.adv_optimizer.init(params), adv_state)
        else:
            adv_state = _pick(last, state.adv_state, adv_state)
        opt_state = _pick(last, opt_state, state.opt_state)
        # the state keeps its dtypes (optax's may widen: an accumulator of a
        # bfloat16 leaf fed float32 updates), so a jitted step never recompiles
        adv_state = _cast_like(adv_state, state.adv_state)
        opt_state = _cast_like(opt_state, state.opt_state)
        steps = (state.steps_since_sync + 1) % self.sync_period
        return updates, SAMState(steps, opt_state, adv_state, cache)

    def _opaque(
        self,
        grads: Updates,
        state: SAMState,
        params: Params,
        grad_fn: GradFn | None,
    ) -> tuple[Updates, SAMState]:
        if grad_fn is None:
            raise ValueError(
                "sam with opaque_mode=True needs grad_fn=: a function of "
                "(params, adversarial step index) returning the gradients, "
                "e.g. opt.step(params, grads, grad_fn=grad_fn)"
            )
        adv_params, adv_updates, adv_state = params, grads, state.adv_state
        for i in range(self.sync_period - 1):
            adv_updates, adv_state = self.adv_optimizer.update(
                adv_updates, adv_state, adv_params
            )
            adv_updates = _negate(adv_updates)
            adv_params = apply_updates(adv_params, adv_updates)
            adv_updates = grad_fn(adv_params, i)
            if self.batch_axis_name is not None:
                adv_updates = jax.lax.pmean(adv_updates, self.batch_axis_name)
        if self.reset_state:
            adv_state = self.adv_optimizer.init(params)
        updates, opt_state = self.optimizer.update(adv_updates, state.opt_state, params)
        return updates, SAMState(zero_count(), opt_state, adv_state, None)


def sam(
    optimizer: Any,
    adv_optimizer: Any,
    sync_period: int = 2,
    reset_state: bool = True,
    opaque_mode: bool = False,
    batch_axis_name: str | None = None,
) -> SAM:
    """Sharpness-Aware Minimization (shardopt or optax inner optimizers).

    The paper's SAM is ``sam(sgd(lr), chain(normalize(), sgd(rho)))``: one
    ascent step of length ``rho`` along the normalized gradient, then a
    descent step from the original weights. ``sync_period`` is the period
    (one outer step every ``sync_period`` calls); ``reset_state`` restarts
    the adversarial optimizer after each outer step. With ``opaque_mode``
    every call is a full period and needs ``grad_fn=`` (passed through
    ``Optimizer.step``); ``batch_axis_name`` averages its gradients over a
    ``shard_map``/``pmap`` axis. Foret et al., "Sharpness-Aware Minimization
    for Efficiently Improving Generalization", ICLR 2021.
    """
    if batch_axis_name is not None and not isinstance(batch_axis_name, str):
        raise TypeError(f"batch_axis_name must be a str, got {batch_axis_name!r}")
    return SAM(
        as_transform(optimizer, "sam's optimizer"),
        as_transform(adv_optimizer, "sam's adv_optimizer"),
        check_int(sync_period, "sync_period", 1),
        check_bool(reset_state, "reset_state"),
        check_bool(opaque_mode, "opaque_mode"),
        batch_axis_name,
    )
