"""Stochastic gradient descent and its momentum variants."""

from __future__ import annotations

from jax.typing import DTypeLike

from .._base import identity
from .._hyperparams import ScalarOrSchedule
from .._transforms._combinators import Chain, chain
from .._transforms._lowbit import QuantizeState, with_state_bits
from .._transforms._moments import trace
from .._transforms._scale import scale_by_learning_rate
from .._tree_math import canonical_dtype


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: ScalarOrSchedule | None = None,
    nesterov: bool = False,
    accumulator_dtype: DTypeLike | None = None,
    *,
    state_bits: int | None = None,
) -> Chain | QuantizeState:
    """Stochastic gradient descent, with optional (Nesterov) momentum.

    Robbins & Monro, "A Stochastic Approximation Method", 1951; momentum after
    Sutskever et al., "On the importance of initialization and momentum in deep
    learning", ICML 2013.

    ``state_bits=8`` keeps the moments in 8 bits (:func:`shardopt.quantize_state`).
    """
    # checked without momentum too: a bad dtype is an error either way
    accumulator_dtype = canonical_dtype(accumulator_dtype, "accumulator_dtype")
    momentum_part = (
        identity()
        if momentum is None
        else trace(momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)
    )
    return with_state_bits(
        chain(momentum_part, scale_by_learning_rate(learning_rate)), state_bits
    )
