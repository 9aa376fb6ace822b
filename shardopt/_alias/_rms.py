"""Optimizers that divide by accumulated squared gradients: RMSProp, Adagrad."""

from __future__ import annotations

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
) -> Chain:
    """RMSProp, optionally centred and with momentum.

    Tieleman & Hinton, "Lecture 6.5 - RMSProp", 2012; centred: Graves, 2013.
    """
    scaling = scale_by_stddev if centered else scale_by_rms
    return chain(
        scaling(decay, eps, initial_scale, eps_in_sqrt, bias_correction),
        scale_by_learning_rate(learning_rate),
        identity() if momentum is None else trace(momentum, nesterov=nesterov),
    )


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: ScalarOrSchedule = 1e-7,
) -> Chain:
    """Adagrad: steps divided by the root of all squared gradients so far.

    Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011.
    """
    return chain(
        scale_by_rss(initial_accumulator_value, eps),
        scale_by_learning_rate(learning_rate),
    )
