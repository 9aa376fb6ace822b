"""optax.contrib's adaptive optimizers: ACProp, AdEMAMix, ADOPT, MADGRAD, MoMo and
the parameter-free ones (COCOB, D-Adaptation, DoG, DoWG, Prodigy).

Same names, arguments and defaults as optax 0.2.8's ``optax.contrib``.
"""

from __future__ import annotations

from collections.abc import Callable

from jax.typing import DTypeLike
from jaxtyping import Array

from .._base import identity
from .._hyperparams import ScalarOrSchedule
from .._transforms._acprop_adopt import quarter_power, scale_by_acprop, scale_by_adopt
from .._transforms._ademamix import scale_by_ademamix, scale_by_simplified_ademamix
from .._transforms._combinators import Chain, chain
from .._transforms._decay import add_decayed_weights
from .._transforms._dog import scale_by_dog, scale_by_dowg
from .._transforms._madgrad import scale_by_madgrad
from .._transforms._momo import Momo, MomoAdam
from .._transforms._parameter_free import DAdaptAdamW, Prodigy, scale_by_cocob
from .._transforms._scale import scale_by_learning_rate
from ._types import Mask


def acprop(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-16,
    eps_root: ScalarOrSchedule = 1e-16,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Mask = None,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """ACProp: AdaBelief's centred second moment, applied one step late.

    ``u = -lr (g / (sqrt(s_hat_{t-1}) + eps) + wd x)``. Zhuang et al.,
    "Momentum Centering and Asynchronous Update for Adaptive Gradient
    Methods", NeurIPS 2021. ``mu_dtype`` / ``nu_dtype`` store the moments
    narrower (see :func:`scale_by_acprop`).
    """
    return chain(
        scale_by_acprop(b1, b2, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def ademamix(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Mask = None,
) -> Chain:
    """AdEMAMix: AdamW with a slow momentum mixed into the fast one.

    ``u = -lr ((m1_hat + alpha m2) / (sqrt(nu_hat + eps_root) + eps) + wd x)``.
    Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster,
    Older", ICLR 2025 (arXiv 2024).
    """
    return chain(
        scale_by_ademamix(b1, b2, b3, alpha, eps, eps_root, mu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def simplified_ademamix(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.99,
    b2: ScalarOrSchedule = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Mask = None,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """Simplified AdEMAMix: one undamped momentum plus ``alpha`` times the gradient.

    ``u = -lr ((m + alpha g) / (sqrt(n_hat + eps_root) + eps) + wd x)``,
    ``m = g + b1 m``. Morwani, Vyas, Kakade & Mohri, "Connections between
    Schedule-Free Optimizers, AdEMAMix, and Accelerated SGD Variants", arXiv
    2025. ``mu_dtype`` / ``nu_dtype`` store ``m`` and ``n`` narrower.
    """
    return chain(
        scale_by_simplified_ademamix(
            b1, b2, alpha, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype
        ),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def adopt(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.9999,
    eps: ScalarOrSchedule = 1e-6,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[Array], Array] = quarter_power,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """ADOPT: Adam that normalises the gradient by the previous second moment.

    ``u = -lr m``, ``m = b1 m + (1 - b1) clip(g / max(sqrt(v_prev), eps))``.
    Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with
    the Optimal Rate", NeurIPS 2024. ``mu_dtype`` (optax's) / ``nu_dtype``
    store the moments narrower (see :func:`scale_by_adopt`).
    """
    return chain(
        scale_by_adopt(
            b1,
            b2,
            eps,
            mu_dtype,
            nesterov=nesterov,
            use_clipping=use_clipping,
            clip_value_fn=clip_value_fn,
            nu_dtype=nu_dtype,
        ),
        scale_by_learning_rate(learning_rate),
    )


def cocob(
    learning_rate: ScalarOrSchedule = 1.0,
    alpha: ScalarOrSchedule = 100.0,
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Mask = None,
    *,
    accumulator_dtype: DTypeLike | None = None,
) -> Chain:
    """COCOB-Backprop: coin betting on the gradients scaled by ``learning_rate``.

    ``x = x0 + C / (L max(G + L, alpha L)) (L + R)`` on ``lr (g + wd x)``.
    Orabona & Tommasi, "Training Deep Networks without Learning Rates Through
    Coin Betting", NeurIPS 2017. ``accumulator_dtype`` stores ``C``, ``G``,
    ``L`` and ``R`` narrower (see :func:`scale_by_cocob`).
    """
    return chain(
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate, flip_sign=False),
        scale_by_cocob(alpha, eps, accumulator_dtype=accumulator_dtype),
    )


def dadapt_adamw(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.9, 0.999),
    eps: ScalarOrSchedule = 1e-8,
    estim_lr0: ScalarOrSchedule = 1e-6,
    weight_decay: ScalarOrSchedule = 0.0,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    accumulator_dtype: DTypeLike | None = None,
) -> DAdaptAdamW:
    """D-Adaptation AdamW: Adam whose step size ``d`` estimates ``||x0 - x*||``.

    ``u = -wd dlr x - m / (sqrt(v) + eps)`` with ``dlr = d lr sqrt(1 - b2^t) /
    (1 - b1^t)``. Defazio & Mishchenko, "Learning-Rate-Free Learning by
    D-Adaptation", ICML 2023. ``mu_dtype``, ``nu_dtype`` and
    ``accumulator_dtype`` store ``m``, ``v`` and ``s`` narrower.
    """
    b1, b2 = betas
    return DAdaptAdamW(
        learning_rate,
        b1,
        b2,
        eps,
        estim_lr0,
        weight_decay,
        mu_dtype,
        nu_dtype,
        accumulator_dtype,
    )


def prodigy(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[ScalarOrSchedule, ScalarOrSchedule] = (0.9, 0.999),
    beta3: ScalarOrSchedule | None = None,
    eps: ScalarOrSchedule = 1e-8,
    estim_lr0: ScalarOrSchedule = 1e-6,
    estim_lr_coef: ScalarOrSchedule = 1.0,
    weight_decay: ScalarOrSchedule = 0.0,
    safeguard_warmup: bool = False,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
    accumulator_dtype: DTypeLike | None = None,
) -> Prodigy:
    """Prodigy: D-Adaptation's Adam with ``d`` from ``<g, x0 - x>``.

    ``u = -wd dlr x - dlr m / (sqrt(v) + d eps)``; ``beta3`` defaults to
    ``sqrt(b2)``. Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive
    Parameter-Free Learner", ICML 2024. ``mu_dtype``, ``nu_dtype`` and
    ``accumulator_dtype`` store ``m``, ``v`` and ``s`` narrower.
    """
    b1, b2 = betas
    return Prodigy(
        learning_rate,
        b1,
        b2,
        beta3,
        eps,
        estim_lr0,
        estim_lr_coef,
        weight_decay,
        safeguard_warmup,
        mu_dtype,
        nu_dtype,
        accumulator_dtype,
    )


def dog(
    learning_rate: ScalarOrSchedule = 1.0,
    init_step: tuple[str, ScalarOrSchedule] = ("heuristic", 1e-6),
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule | None = None,
    mask: Mask = None,
) -> Chain:
    """DoG: SGD at ``max_t ||x_t - x0|| / sqrt(sum ||g||^2 + eps)`` over the whole tree.

    ``u = -lr rate (g + wd x)``; ``init_step`` is ``("heuristic", r)``,
    ``("distance", r)`` or ``("learning_rate", lr0)``. Ivgi, Hinder & Carmon,
    "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule",
    ICML 2023.
    """
    return chain(
        identity() if weight_decay is None else add_decayed_weights(weight_decay, mask),
        scale_by_dog(init_step, eps),
        scale_by_learning_rate(learning_rate),
    )


def dowg(
    learning_rate: ScalarOrSchedule = 1.0,
    init_estim_sq_dist: ScalarOrSchedule | None = None,
    eps: ScalarOrSchedule = 1e-4,
    weight_decay: ScalarOrSchedule | None = None,
    mask: Mask = None,
) -> Chain:
    """DoWG: SGD at ``r^2 / (sqrt(sum_t r_t^2 ||g_t||^2) + eps)``, ``r`` the distance.

    ``u = -lr rate (g + wd x)``. Khaled, Mishchenko & Jin, "DoWG Unleashed: An
    Efficient Universal Parameter-Free Gradient Descent Method", NeurIPS 2023.
    """
    return chain(
        identity() if weight_decay is None else add_decayed_weights(weight_decay, mask),
        scale_by_dowg(init_estim_sq_dist, eps),
        scale_by_learning_rate(learning_rate),
    )


def madgrad(
    learning_rate: ScalarOrSchedule,
    momentum: ScalarOrSchedule = 0.9,
    weight_decay: ScalarOrSchedule = 0.0,
    eps: ScalarOrSchedule = 1e-6,
    *,
    accumulator_dtype: DTypeLike | None = None,
) -> Chain:
    """MADGRAD: dual averaging with a cube-root preconditioner and momentum.

    ``z = x0 - s / (cbrt(G) + eps)``, ``x = (1 - momentum) z + momentum x`` on
    ``g + wd x``. Defazio & Jelassi, "A Momentumized, Adaptive, Dual Averaged
    Gradient Method for Stochastic Optimization", JMLR 2022 (arXiv 2021).
    ``accumulator_dtype`` stores the sums ``G`` and ``s`` narrower.
    """
    return chain(
        add_decayed_weights(weight_decay),
        scale_by_madgrad(
            learning_rate, momentum, eps, accumulator_dtype=accumulator_dtype
        ),
    )


def momo(
    learning_rate: ScalarOrSchedule = 1.0,
    beta: ScalarOrSchedule = 0.9,
    lower_bound: ScalarOrSchedule = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    adapt_lower_bound: bool = False,
    *,
    mu_dtype: DTypeLike | None = None,
) -> Momo:
    """MoMo: SGD with momentum whose step is capped by a model of the loss.

    ``tau = min(lr, max(fbar - lb - gamma + <m, x>, 0) / ||m||^2)``,
    ``u = -tau m``; needs ``value=loss`` at every step. Schaipp, Ohana,
    Eickenberg, Defazio & Gower, "MoMo: Momentum Models for Adaptive Learning
    Rates", ICML 2024. ``mu_dtype`` stores the momentum narrower.
    """
    return Momo(
        learning_rate, beta, lower_bound, weight_decay, adapt_lower_bound, mu_dtype
    )


def momo_adam(
    learning_rate: ScalarOrSchedule = 1e-2,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    lower_bound: ScalarOrSchedule = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    adapt_lower_bound: bool = False,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> MomoAdam:
    """MoMo-Adam: Adam's direction with MoMo's model-capped step size.

    ``tau = min(lr / c1, max(fbar - c1 lb - gamma + <m, x>, 0) / <m, m / D>)``,
    ``u = -tau m / D``; needs ``value=loss`` at every step. Schaipp, Ohana,
    Eickenberg, Defazio & Gower, "MoMo: Momentum Models for Adaptive Learning
    Rates", ICML 2024. ``mu_dtype`` / ``nu_dtype`` store ``m`` and ``v``
    narrower.
    """
    return MomoAdam(
        learning_rate,
        b1,
        b2,
        eps,
        lower_bound,
        weight_decay,
        adapt_lower_bound,
        mu_dtype,
        nu_dtype,
    )
