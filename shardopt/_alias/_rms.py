"""Optimizers that divide by accumulated squared gradients: RMSProp, Adagrad."""

from __future__ import annotations

from jax.typing import DTypeLike

from .._base import identity
from .._hyperparams import ScalarOrSchedule
from .._transforms._combinators import Chain, chain
from .._transforms._moments import trace
from .._transforms._rms import scale_by_rms, scale_by_rss, scale_by_stddev
from .._transforms._scale import scale_by_learning_rate


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: ScalarOrSchedule = 0.9,
    eps: ScalarOrSchedule = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: ScalarOrSchedule | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    nu_dtype: DTypeLike | None = None,
    mu_dtype: DTypeLike | None = None,
    accumulator_dtype: DTypeLike | None = None,
) -> Chain:
    """RMSProp, optionally centred and with momentum.

    Storage dtypes (default: each parameter's): ``nu_dtype`` for the average
    of squared gradients, ``mu_dtype`` for the centred form's average of
    gradients, ``accumulator_dtype`` for the momentum; averages are updated
    in float32 and rounded once when stored.

    Tieleman & Hinton, "Lecture 6.5 - RMSProp", 2012; centred: Graves, 2013.
    """
    args = (decay, eps, initial_scale, eps_in_sqrt, bias_correction)
    if centered:
        scaling = scale_by_stddev(*args, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    elif mu_dtype is not None:
        raise ValueError(
            "mu_dtype is the dtype of the centred form's average of gradients; "
            "rmsprop keeps one only with centered=True"
        )
    else:
        scaling = scale_by_rms(*args, nu_dtype=nu_dtype)
    if momentum is None and accumulator_dtype is not None:
        raise ValueError(
            "accumulator_dtype is the dtype of the momentum; rmsprop keeps one "
            "only when momentum is given"
        )
    return chain(
        scaling,
        scale_by_learning_rate(learning_rate),
        identity()
        if momentum is None
        else trace(momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype),
    )


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: ScalarOrSchedule = 1e-7,
    *,
    accumulator_dtype: DTypeLike | None = None,
) -> Chain:
    """Adagrad: steps divided by the root of all squared gradients so far.

    ``accumulator_dtype`` stores the sum of squares narrower (summed in
    float32, rounded once when stored).

    Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011.
    """
    return chain(
        scale_by_rss(
            initial_accumulator_value, eps, accumulator_dtype=accumulator_dtype
        ),
        scale_by_learning_rate(learning_rate),
    )
