"""Decoupled weight decay."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jaxtyping import Array

from .._base import AbstractCountingTransform, AbstractTransform, Params, Updates
from .._hyperparams import Hyperparameter, ScalarOrSchedule, hyperparameter, resolve
from .._tree_math import add
from ._combinators import masked

NO_PARAMS = (
    "add_decayed_weights needs the parameters: call update(grads, state, params)."
)


class AddDecayedWeights(AbstractCountingTransform):
    """Add ``weight_decay * param`` to each update.

    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """

    elementwise = True

    weight_decay: Hyperparameter = hyperparameter("weight_decay")

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        if params is None:
            raise ValueError(NO_PARAMS)
        decay = resolve(self.weight_decay, count, name="weight_decay")
        return jax.tree.map(
            lambda g, p: add(g, decay.astype(p.dtype) * p), grads, params
        )


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Params | Callable[[Params], Params] | None = None,
) -> AbstractTransform:
    """Add ``weight_decay * params`` to the updates, only where ``mask`` is True."""
    transform = AddDecayedWeights(weight_decay)
    return transform if mask is None else masked(transform, mask)
