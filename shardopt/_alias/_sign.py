"""Sign-based optimizers: signSGD, signum, Lion."""

from __future__ import annotations

from jax.typing import DTypeLike

from .._hyperparams import UNIT_INTERVAL, ScalarOrSchedule, as_hyperparameter
from .._transforms._averaging import ema
from .._transforms._combinators import Chain, chain
from .._transforms._decay import add_decayed_weights
from .._transforms._lowbit import QuantizeState, with_state_bits
from .._transforms._scale import scale_by_learning_rate
from .._transforms._sign import scale_by_lion, scale_by_sign
from ._types import Mask


def lion(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.99,
    mu_dtype: DTypeLike | None = None,
    weight_decay: ScalarOrSchedule = 1e-3,
    mask: Mask = None,
    *,
    state_bits: int | None = None,
) -> Chain | QuantizeState:
    """Lion. Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023.

    ``state_bits=8`` keeps the moments in 8 bits (:func:`shardopt.quantize_state`).
    """
    return with_state_bits(
        chain(
            scale_by_lion(b1, b2, mu_dtype),
            add_decayed_weights(weight_decay, mask),
            scale_by_learning_rate(learning_rate),
        ),
        state_bits,
    )


def sign_sgd(learning_rate: ScalarOrSchedule) -> Chain:
    """signSGD: descend along the sign of each gradient component.

    ``u = -lr * sign(g)``. Bernstein et al., "signSGD: Compressed Optimisation
    for Non-Convex Problems", ICML 2018; Balles, Pedregosa & Le Roux, "The
    Geometry of Sign Gradient Descent", arXiv:2002.08056, 2020.
    """
    return chain(scale_by_sign(), scale_by_learning_rate(learning_rate))


def signum(
    learning_rate: ScalarOrSchedule,
    beta: ScalarOrSchedule = 0.9,
    accumulator_dtype: DTypeLike | None = None,
) -> Chain:
    """Signum: descend along the sign of a moving average of the gradients.

    ``m = beta m + (1 - beta) g``, ``u = -lr * sign(m)``. Bernstein et al.,
    "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018;
    Zhao et al., "Deconstructing What Makes a Good Optimizer for Language
    Models", arXiv:2407.07972, 2024.
    """
    return chain(
        # no debiasing: a positive factor does not change the sign
        ema(
            as_hyperparameter(beta, name="beta", domain=UNIT_INTERVAL),
            debias=False,
            accumulator_dtype=accumulator_dtype,
        ),
        scale_by_sign(),
        scale_by_learning_rate(learning_rate),
    )
