"""Decoupled weight decay."""

from __future__ import annotations

from collections.abc import Callable

import jax

from .._base import (
    AbstractTransform,
    CountState,
    Params,
    Updates,
    safe_increment,
    zero_count,
)
from .._combine import masked
from .._hyperparams import Hyperparameter, ScalarOrSchedule, hyperparameter, resolve
from .._tree_math import add

NO_PARAMS = (
    "add_decayed_weights needs the parameters: call update(grads, state, params)."
)


class AddDecayedWeights(AbstractTransform):
    """Add ``weight_decay * param`` to each update.

    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """

    weight_decay: Hyperparameter = hyperparameter("weight_decay")

    def init(self, params: Params) -> CountState:
        del params
        return CountState(zero_count())

    def update(
        self, grads: Updates, state: CountState, params: Params | None = None
    ) -> tuple[Updates, CountState]:
        if params is None:
            raise ValueError(NO_PARAMS)
        decay = resolve(self.weight_decay, state.count, name="weight_decay")
        updates = jax.tree.map(
            lambda g, p: add(g, decay.astype(p.dtype) * p), grads, params
        )
        return updates, CountState(safe_increment(state.count))


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Params | Callable[[Params], Params] | None = None,
) -> AbstractTransform:
    """Add ``weight_decay * params`` to the updates, only where ``mask`` is True."""
    transform = AddDecayedWeights(weight_decay)
    return transform if mask is None else masked(transform, mask)
