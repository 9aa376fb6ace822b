"""DP-SGD: differentially private stochastic gradient descent."""

from __future__ import annotations

from jax.typing import DTypeLike

from .._base import identity
from .._hyperparams import ScalarOrSchedule
from .._transforms._combinators import Chain, chain
from .._transforms._moments import trace
from .._transforms._privacy import differentially_private_aggregate
from .._transforms._scale import scale_by_learning_rate
from .._tree_math import canonical_dtype


def dpsgd(
    learning_rate: ScalarOrSchedule,
    l2_norm_clip: float,
    noise_multiplier: float,
    seed: int,
    momentum: ScalarOrSchedule | None = None,
    nesterov: bool = False,
    *,
    accumulator_dtype: DTypeLike | None = None,
) -> Chain:
    """DP-SGD: SGD (optionally with momentum) on privately aggregated gradients.

    Takes per-example gradients: ``opt.step(params, per_example_grads)`` with
    a leading batch dim on every leaf. Each example's gradient is clipped to
    norm ``l2_norm_clip``; Gaussian noise of standard deviation
    ``l2_norm_clip * noise_multiplier`` is added to their sum, seeded by
    ``seed``. Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
    ``accumulator_dtype`` stores the momentum narrower, as :func:`trace` does.
    """
    # checked without momentum too: a bad dtype is an error either way
    accumulator_dtype = canonical_dtype(accumulator_dtype, "accumulator_dtype")
    momentum_part = (
        identity()
        if momentum is None
        else trace(momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)
    )
    return chain(
        differentially_private_aggregate(l2_norm_clip, noise_multiplier, seed),
        momentum_part,
        scale_by_learning_rate(learning_rate),
    )
