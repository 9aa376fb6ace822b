"""Adam and its decoupled-weight-decay form."""

from __future__ import annotations

from jax.typing import DTypeLike

from .._hyperparams import ScalarOrSchedule
from .._transforms._combinators import Chain, chain
from .._transforms._decay import add_decayed_weights
from .._transforms._lowbit import QuantizeState, with_state_bits
from .._transforms._moments import scale_by_adam
from .._transforms._scale import scale_by_learning_rate
from ._types import Mask


def adam(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> Chain | QuantizeState:
    """Adam: bias-corrected first moment over the root of the second.

    ``mu_dtype`` and ``nu_dtype`` store the moments narrower (e.g. bfloat16);
    the second moment is updated in float32 and rounded once when stored.

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.

    ``state_bits=8`` keeps the moments in 8 bits (:func:`shardopt.quantize_state`).
    """
    return with_state_bits(
        chain(
            scale_by_adam(
                b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype
            ),
            scale_by_learning_rate(learning_rate),
        ),
        state_bits,
    )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Mask = None,
    *,
    nesterov: bool = False,
    nu_dtype: DTypeLike | None = None,
    state_bits: int | None = None,
) -> Chain | QuantizeState:
    """Adam with decoupled weight decay, applied where ``mask`` is True.

    ``mu_dtype`` and ``nu_dtype`` store the moments narrower, as in :func:`adam`.

    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.

    ``state_bits=8`` keeps the moments in 8 bits (:func:`shardopt.quantize_state`).
    """
    return with_state_bits(
        chain(
            scale_by_adam(
                b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype
            ),
            add_decayed_weights(weight_decay, mask),
            scale_by_learning_rate(learning_rate),
        ),
        state_bits,
    )
