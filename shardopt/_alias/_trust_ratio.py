"""Layer-wise trust-ratio optimizers: Fromage, LARS, LAMB."""

from __future__ import annotations

from jax.typing import DTypeLike

from .._base import AbstractTransform
from .._hyperparams import UNIT_INTERVAL, ScalarOrSchedule, as_hyperparameter
from .._transforms._combinators import Chain, chain, masked
from .._transforms._decay import add_decayed_weights
from .._transforms._moments import scale_by_adam, trace
from .._transforms._scale import scale_by_learning_rate
from .._transforms._trust_ratio import fromage_step, scale_by_trust_ratio
from ._types import Mask


def _where(transform: AbstractTransform, mask: Mask | bool) -> AbstractTransform:
    """``transform`` where ``mask`` is True; True (or None) means everywhere."""
    if mask is True or mask is None:
        return transform
    return masked(transform, mask)


def fromage(
    learning_rate: ScalarOrSchedule, min_norm: ScalarOrSchedule = 1e-6
) -> Chain:
    """Fromage: trust-ratio steps that keep the parameter norms from growing.

    ``u = -lr m (||p|| / ||g||) g + (m - 1) p`` per leaf, with
    ``m = 1 / sqrt(1 + lr^2)`` (norms floored at ``min_norm``). Bernstein et
    al., "On the distance between two neural networks and the stability of
    learning", NeurIPS 2020.
    """
    return chain(scale_by_trust_ratio(min_norm), fromage_step(learning_rate))


def lars(
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Mask | bool = True,
    trust_coefficient: ScalarOrSchedule = 0.001,
    eps: ScalarOrSchedule = 0.0,
    trust_ratio_mask: Mask | bool = True,
    momentum: ScalarOrSchedule = 0.9,
    nesterov: bool = False,
    *,
    accumulator_dtype: DTypeLike | None = None,
) -> Chain:
    """LARS: SGD with momentum on layer-wise trust-ratio-scaled, decayed gradients.

    ``v = g + wd p``, ``v = c ||p|| / (||v|| + eps) v``, then momentum on
    ``-lr v``. You, Gitman & Ginsburg, "Large Batch Training of Convolutional
    Networks", arXiv:1708.03888, 2017. ``accumulator_dtype`` stores the
    momentum narrower, as :func:`trace` does.
    """
    return chain(
        _where(add_decayed_weights(weight_decay), weight_decay_mask),
        _where(
            scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps),
            trust_ratio_mask,
        ),
        scale_by_learning_rate(learning_rate),
        trace(
            as_hyperparameter(momentum, name="momentum", domain=UNIT_INTERVAL),
            nesterov=nesterov,
            accumulator_dtype=accumulator_dtype,
        ),
    )


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-6,
    eps_root: ScalarOrSchedule = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Mask = None,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """LAMB: Adam's direction plus weight decay, scaled by a layer-wise trust ratio.

    ``v = adam(g) + wd p``, ``u = -lr ||p|| / ||v|| v``. You et al., "Large
    Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR
    2020. ``mu_dtype`` / ``nu_dtype`` store Adam's moments narrower, as in
    :func:`scale_by_adam`.
    """
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )
