"""Adam's relatives as optimizers: Nadam, Adamax, AMSGrad, AdaBelief, Yogi, RAdam."""

from __future__ import annotations

from jax.typing import DTypeLike

from .._hyperparams import ScalarOrSchedule
from .._transforms._adam_family import (
    scale_by_adamax,
    scale_by_amsgrad,
    scale_by_belief,
    scale_by_radam,
    scale_by_yogi,
)
from .._transforms._combinators import Chain, chain
from .._transforms._decay import add_decayed_weights
from .._transforms._scale import scale_by_learning_rate
from ._adam import adam, adamw
from ._types import Mask


def nadam(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = True,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """Nadam: Adam with Nesterov momentum (``adam(..., nesterov=True)``).

    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR Workshop 2016.
    """
    return adam(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        nesterov=nesterov,
        nu_dtype=nu_dtype,
    )


def nadamw(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Mask = None,
    *,
    nesterov: bool = True,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """NadamW: Nadam with decoupled weight decay (``adamw(..., nesterov=True)``).

    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR Workshop 2016;
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
    """
    return adamw(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        nesterov=nesterov,
        nu_dtype=nu_dtype,
    )


def adamax(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    *,
    nu_dtype: DTypeLike | None = None,
    mu_dtype: DTypeLike | None = None,
) -> Chain:
    """Adamax: Adam with the infinity norm in place of the second moment.

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, §7.1.
    """
    return chain(
        scale_by_adamax(b1, b2, eps, nu_dtype=nu_dtype, mu_dtype=mu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def adamaxw(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Mask = None,
    *,
    nu_dtype: DTypeLike | None = None,
    mu_dtype: DTypeLike | None = None,
) -> Chain:
    """Adamax with decoupled weight decay, applied where ``mask`` is True.

    Kingma & Ba, ICLR 2015, §7.1; Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019.
    """
    return chain(
        scale_by_adamax(b1, b2, eps, nu_dtype=nu_dtype, mu_dtype=mu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """AMSGrad: Adam with the running maximum of the second moment.

    Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR 2018.
    """
    return chain(
        scale_by_amsgrad(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            bias_correction_mu,
            bias_correction_nu,
            nu_dtype=nu_dtype,
        ),
        scale_by_learning_rate(learning_rate),
    )


def adabelief(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-16,
    eps_root: ScalarOrSchedule = 1e-16,
    *,
    nesterov: bool = False,
    nu_dtype: DTypeLike | None = None,
    mu_dtype: DTypeLike | None = None,
) -> Chain:
    """AdaBelief: Adam scaled by the belief in the observed gradient.

    Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
    Observed Gradients", NeurIPS 2020.
    """
    return chain(
        scale_by_belief(
            b1,
            b2,
            eps,
            eps_root,
            nesterov=nesterov,
            nu_dtype=nu_dtype,
            mu_dtype=mu_dtype,
        ),
        scale_by_learning_rate(learning_rate),
    )


def yogi(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-3,
    *,
    nu_dtype: DTypeLike | None = None,
    mu_dtype: DTypeLike | None = None,
) -> Chain:
    """Yogi: Adam with an additive, sign-controlled second-moment update.

    Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018.
    """
    return chain(
        scale_by_yogi(b1, b2, eps, nu_dtype=nu_dtype, mu_dtype=mu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def radam(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    threshold: ScalarOrSchedule = 5.0,
    *,
    nesterov: bool = False,
    nu_dtype: DTypeLike | None = None,
    mu_dtype: DTypeLike | None = None,
) -> Chain:
    """RAdam: Adam with a variance-rectified adaptive step.

    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond",
    ICLR 2020.
    """
    return chain(
        scale_by_radam(
            b1,
            b2,
            eps,
            eps_root,
            threshold,
            nesterov=nesterov,
            nu_dtype=nu_dtype,
            mu_dtype=mu_dtype,
        ),
        scale_by_learning_rate(learning_rate),
    )
