"""NovoGrad, Adan and the optimistic methods as optimizers."""

from __future__ import annotations

import warnings

from jax.typing import DTypeLike

from .._hyperparams import NONNEGATIVE, ScalarOrSchedule, as_hyperparameter
from .._transforms._adam_variants import (
    scale_by_adan,
    scale_by_novograd,
    scale_by_optimistic_gradient,
)
from .._transforms._combinators import Chain, chain
from .._transforms._decay import add_decayed_weights
from .._transforms._moments import scale_by_adam
from .._transforms._scale import scale_by_learning_rate
from ._types import Mask


def adan(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.98,
    b2: ScalarOrSchedule = 0.92,
    b3: ScalarOrSchedule = 0.99,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Mask = None,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """Adan, with decoupled weight decay applied where ``mask`` is True.

    Xie, Zhou, Li, Lin & Yan, "Adan: Adaptive Nesterov Momentum Algorithm for
    Faster Optimizing Deep Models", IEEE TPAMI 2024 (arXiv 2022).
    ``mu_dtype`` / ``nu_dtype`` store the moments narrower (see
    :func:`scale_by_adan`).
    """
    return chain(
        scale_by_adan(b1, b2, b3, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def novograd(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.25,
    eps: ScalarOrSchedule = 1e-6,
    eps_root: ScalarOrSchedule = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    mu_dtype: DTypeLike | None = None,
) -> Chain:
    """NovoGrad: momentum of gradients normalised per layer, with weight decay.

    Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive
    Moments for Training of Deep Networks", arXiv 2019. ``mu_dtype`` stores
    the momentum narrower, as :func:`scale_by_novograd` (its second moment is
    one scalar per layer and stays in the parameters' dtype).
    """
    return chain(
        scale_by_novograd(b1, b2, eps, eps_root, weight_decay, mu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def optimistic_gradient_descent(
    learning_rate: ScalarOrSchedule,
    alpha: ScalarOrSchedule = 1.0,
    beta: ScalarOrSchedule = 1.0,
) -> Chain:
    """Optimistic gradient descent: ``-lr ((alpha + beta) g_t - beta g_{t-1})``.

    Mokhtari, Ozdaglar & Pattathil, "A Unified Analysis of Extra-gradient and
    Optimistic Gradient Methods for Saddle Point Problems: Proximal Point
    Approach", AISTATS 2020.
    """
    return chain(
        scale_by_optimistic_gradient(alpha, beta),
        scale_by_learning_rate(learning_rate),
    )


def optimistic_adam(
    learning_rate: float,
    optimism: float | None = None,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-08,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = True,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """Optimistic Adam (deprecated in optax: use :func:`optimistic_adam_v2`).

    Adam's direction ``d`` is stepped optimistically,
    ``-(lr + optimism) d_t + optimism d_{t-1}``; ``optimism`` defaults to
    ``learning_rate``, which must be a number (no schedule).

    Daskalakis, Ilyas, Syrgkanis & Zeng, "Training GANs with Optimism", ICLR 2018.
    """
    warnings.warn(
        "`optimistic_adam` is deprecated, please use `optimistic_adam_v2` instead.",
        category=DeprecationWarning,
        stacklevel=2,
    )
    if callable(learning_rate):
        raise ValueError(
            "optimistic_adam's learning_rate must be a number, not a schedule; "
            "optimistic_adam_v2 takes schedules"
        )
    learning_rate = as_hyperparameter(
        learning_rate, name="learning_rate", domain=NONNEGATIVE
    )
    if optimism is None:
        optimism = learning_rate
    optimism = as_hyperparameter(optimism, name="optimism", domain=NONNEGATIVE)
    return chain(
        scale_by_adam(
            b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype
        ),
        scale_by_optimistic_gradient(alpha=learning_rate, beta=optimism),
        scale_by_learning_rate(1.0),
    )


def optimistic_adam_v2(
    learning_rate: ScalarOrSchedule,
    *,
    alpha: ScalarOrSchedule = 1.0,
    beta: ScalarOrSchedule = 1.0,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-08,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
    nesterov: bool = True,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """Optimistic Adam: Adam's direction ``d`` as ``(alpha + beta) d_t - beta d_{t-1}``.

    Daskalakis, Ilyas, Syrgkanis & Zeng, "Training GANs with Optimism", ICLR 2018.
    """
    return chain(
        scale_by_adam(
            b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype
        ),
        scale_by_optimistic_gradient(alpha, beta),
        scale_by_learning_rate(learning_rate),
    )
