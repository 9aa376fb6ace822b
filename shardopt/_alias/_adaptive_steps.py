"""Optimizers whose step sizes adapt: Rprop, Adadelta, noisy SGD, Polyak SGD."""

from __future__ import annotations

from typing import Literal

from jax.typing import DTypeLike
from jaxtyping import ArrayLike

from .._hyperparams import NONNEGATIVE, ScalarOrSchedule, as_hyperparameter
from .._transforms._adadelta import scale_by_adadelta
from .._transforms._combinators import Chain, chain
from .._transforms._decay import add_decayed_weights
from .._transforms._noise import add_noise
from .._transforms._polyak import scale_by_polyak
from .._transforms._rprop import scale_by_rprop
from .._transforms._scale import scale, scale_by_learning_rate
from ._sgd import sgd
from ._types import Mask


def rprop(
    learning_rate: ScalarOrSchedule,
    eta_minus: ScalarOrSchedule = 0.5,
    eta_plus: ScalarOrSchedule = 1.2,
    min_step_size: ScalarOrSchedule = 1e-6,
    max_step_size: ScalarOrSchedule = 50.0,
) -> Chain:
    """Rprop: per-element step sizes that grow while the gradient keeps its sign.

    ``learning_rate`` is the initial step size. Riedmiller & Braun, "A Direct
    Adaptive Method for Faster Backpropagation Learning: The RPROP Algorithm",
    IEEE ICNN 1993; Igel & Huesken, "Empirical evaluation of the improved
    Rprop learning algorithms", Neurocomputing 2003.
    """
    return chain(
        scale_by_rprop(
            learning_rate, eta_minus, eta_plus, min_step_size, max_step_size
        ),
        scale(-1.0),
    )


def adadelta(
    learning_rate: ScalarOrSchedule | None = None,
    rho: ScalarOrSchedule = 0.9,
    eps: ScalarOrSchedule = 1e-6,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Mask = None,
    *,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """Adadelta, with optional weight decay added to the gradient first.

    ``E[g^2] = rho E[g^2] + (1 - rho) g^2``,
    ``u = -lr sqrt(E[u^2] + eps) / sqrt(E[g^2] + eps) g``. As in optax, with
    ``learning_rate=None`` the rescaled gradient is not negated.
    Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.
    ``nu_dtype`` stores the two averages of squares narrower (see
    :func:`scale_by_adadelta`).
    """
    return chain(
        add_decayed_weights(weight_decay, weight_decay_mask),
        scale_by_adadelta(rho, eps, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def noisy_sgd(
    learning_rate: ScalarOrSchedule,
    eta: ScalarOrSchedule = 0.01,
    gamma: ScalarOrSchedule = 0.55,
    key: ArrayLike | None = None,
    *,
    seed: int | None = None,
) -> Chain:
    """SGD on gradients with annealed Gaussian noise: ``u = -lr (g + N(0, s_t^2))``.

    ``s_t^2 = eta / t^gamma`` at step ``t = 1, 2, ...``; ``key`` (or the older
    ``seed``) seeds the noise. Neelakantan et al., "Adding Gradient Noise
    Improves Learning for Very Deep Networks", ICLR Workshop 2016.
    """
    return chain(
        add_noise(eta, gamma, key, seed=seed),
        scale_by_learning_rate(learning_rate),
    )


def polyak_sgd(
    max_learning_rate: ScalarOrSchedule = 1.0,
    scaling: ScalarOrSchedule = 1.0,
    f_min: ScalarOrSchedule = 0.0,
    eps: ScalarOrSchedule = 0.0,
    variant: Literal["sps", "sps+"] = "sps",
) -> Chain:
    """SGD with the stochastic Polyak step size; its step needs the loss.

    ``u = -s min((f(x) - f_min) / (s^2 ||g||^2 + eps), max_lr) g`` with ``s``
    the ``scaling``; call ``opt.step(params, grads, value=loss)``. Loizou et
    al., "Stochastic Polyak Step-size for SGD: An Adaptive Learning Rate for
    Fast Convergence", AISTATS 2021; Berrada, Zisserman & Kumar, "Training
    Neural Networks for and by Interpolation", ICML 2020; ``sps+``: Garrigos
    et al., arXiv:2307.14528, 2023.
    """
    return chain(
        sgd(as_hyperparameter(scaling, name="scaling", domain=NONNEGATIVE)),
        scale_by_polyak(f_min, max_learning_rate, eps, variant),
    )
