"""The matrix optimizers, each with an AdamW fallback: Muon, Shampoo and SOAP."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
from jax.typing import DTypeLike

from .._base import AbstractTransform
from .._hyperparams import ScalarOrSchedule
from .._transforms._combinators import chain
from .._transforms._decay import add_decayed_weights
from .._transforms._matrix_shapes import (
    WeightDimNumbers,
    dimension_numbers_of,
    scale_by_shape,
    static_dimension_numbers,
)
from .._transforms._muon import DEFAULT_NS_COEFFS, scale_by_muon
from .._transforms._partition import Partition
from .._transforms._scale import scale_by_learning_rate
from .._transforms._shampoo import scale_by_shampoo
from .._transforms._soap import scale_by_soap
from ._adam import adamw
from ._types import Mask


@dataclasses.dataclass(frozen=True)
class MuonLabels:
    """``"muon"`` for the leaves Muon orthogonalizes, ``"adam"`` for the rest:
    2-D leaves by default, else those the dimension numbers give."""

    dimension_numbers: Any

    def __call__(self, params: Any) -> Any:
        if self.dimension_numbers is None:
            return jax.tree.map(lambda x: "muon" if x.ndim == 2 else "adam", params)
        found = dimension_numbers_of(self.dimension_numbers, params)
        labels = ["adam" if d is None else "muon" for _, _, d in found]
        return jax.tree.unflatten(jax.tree.structure(params), labels)


def muon(
    learning_rate: ScalarOrSchedule,
    ns_coeffs: Any = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    beta: ScalarOrSchedule = 0.95,
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Mask = None,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: Literal["frobenius", "spectral", "aol", "schatten"] = "frobenius",
    adam_b1: ScalarOrSchedule = 0.9,
    adam_b2: ScalarOrSchedule = 0.999,
    adam_eps_root: ScalarOrSchedule = 0.0,
    adam_weight_decay: ScalarOrSchedule = 0.0,
    adam_learning_rate: ScalarOrSchedule | None = None,
    muon_weight_dimension_numbers: WeightDimNumbers = None,
    consistent_rms: ScalarOrSchedule | None = None,
    nu_dtype: DTypeLike | None = None,
) -> Partition:
    """Muon: momentum orthogonalized by Newton-Schulz, AdamW for the rest.

    optax.contrib.muon's arguments and numbers. The matrices (2-D leaves, or
    those ``muon_weight_dimension_numbers`` gives; None there sends a leaf to
    AdamW) get :func:`scale_by_muon`, :func:`scale_by_shape`, weight decay
    and the learning rate; every other leaf gets
    ``adamw(adam_learning_rate or learning_rate, adam_b1, adam_b2, eps,
    adam_eps_root, mu_dtype, adam_weight_decay, nesterov=nesterov)``. Under a
    ZeRO plan each device orthogonalizes whole matrices, its share of them
    (see docs/matrix.md). ``nu_dtype`` stores the AdamW leaves' second moment
    narrower (updated in float32, rounded once), as :func:`adamw`'s.

    Jordan et al., "Muon: An optimizer for hidden layers in neural networks",
    2024; Liu et al., "Muon is Scalable for LLM Training", 2025.
    """
    if adam_learning_rate is None:
        adam_learning_rate = learning_rate
    dims = static_dimension_numbers(muon_weight_dimension_numbers)
    matrices = chain(
        scale_by_muon(
            ns_coeffs,
            ns_steps,
            beta,
            eps,
            mu_dtype,
            nesterov=nesterov,
            adaptive=adaptive,
            preconditioning=preconditioning,
            weight_dimension_numbers=dims,
        ),
        scale_by_shape(dims, consistent_rms),
        add_decayed_weights(weight_decay, weight_decay_mask),
        scale_by_learning_rate(learning_rate),
    )
    rest = adamw(
        adam_learning_rate,
        adam_b1,
        adam_b2,
        eps,
        adam_eps_root,
        mu_dtype,
        adam_weight_decay,
        nesterov=nesterov,
        nu_dtype=nu_dtype,
    )
    return Partition(
        ("muon", "adam"),
        (matrices, rest),
        MuonLabels(dims),
        allow_unused=True,
    )


@dataclasses.dataclass(frozen=True)
class MatrixLabels:
    """``label`` for the 2-D leaves, ``"adam"`` for the rest."""

    label: str

    def __call__(self, params: Any) -> Any:
        return jax.tree.map(lambda x: self.label if x.ndim == 2 else "adam", params)


def _with_adam_fallback(
    label: str, matrices: AbstractTransform, rest: AbstractTransform
) -> Partition:
    return Partition(
        (label, "adam"), (matrices, rest), MatrixLabels(label), allow_unused=True
    )


def shampoo(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-6,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Mask = None,
    *,
    adam_eps: ScalarOrSchedule = 1e-8,
    adam_weight_decay: ScalarOrSchedule = 0.0,
    adam_learning_rate: ScalarOrSchedule | None = None,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> Partition:
    """Shampoo for the matrices (grafted to RMSProp), AdamW for the rest.

    The 2-D leaves get :func:`scale_by_shampoo` (``b1`` momentum, ``b2`` the
    factors' and the grafting's decay, ``eps`` the factors' regularizer,
    ``adam_eps`` the grafting's), weight decay and the learning
    rate; every other leaf ``adamw(adam_learning_rate or learning_rate, b1,
    b2, adam_eps, weight_decay=adam_weight_decay)``. Under a plan each device
    computes the inverse roots of whole matrices, its share of them.
    ``mu_dtype`` / ``nu_dtype`` store both parts' moments narrower.

    Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor
    Optimization", ICML 2018; Anil et al., "Scalable Second Order
    Optimization for Deep Learning", 2020.
    """
    matrices = chain(
        scale_by_shampoo(b1, b2, eps, adam_eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, weight_decay_mask),
        scale_by_learning_rate(learning_rate),
    )
    rest = adamw(
        learning_rate if adam_learning_rate is None else adam_learning_rate,
        b1,
        b2,
        adam_eps,
        mu_dtype=mu_dtype,
        weight_decay=adam_weight_decay,
        nu_dtype=nu_dtype,
    )
    return _with_adam_fallback("shampoo", matrices, rest)


def soap(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.95,
    b2: ScalarOrSchedule = 0.95,
    shampoo_beta: ScalarOrSchedule | None = None,
    eps: ScalarOrSchedule = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Mask = None,
    precondition_frequency: int = 10,
    *,
    adam_weight_decay: ScalarOrSchedule = 0.0,
    adam_learning_rate: ScalarOrSchedule | None = None,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> Partition:
    """SOAP for the matrices (Adam in Shampoo's eigenbasis), AdamW for the rest.

    The 2-D leaves get :func:`scale_by_soap`, weight decay and the learning
    rate; every other leaf ``adamw(adam_learning_rate or learning_rate, b1,
    b2, eps, weight_decay=adam_weight_decay)`` (SOAP on a vector is Adam).
    Under a plan each device computes the eigenbases of whole matrices, its
    share of them. ``mu_dtype`` / ``nu_dtype`` store both parts' moments
    narrower.

    Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", ICLR 2025.
    """
    matrices = chain(
        scale_by_soap(
            b1,
            b2,
            shampoo_beta,
            eps,
            precondition_frequency,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        add_decayed_weights(weight_decay, weight_decay_mask),
        scale_by_learning_rate(learning_rate),
    )
    rest = adamw(
        learning_rate if adam_learning_rate is None else adam_learning_rate,
        b1,
        b2,
        eps,
        mu_dtype=mu_dtype,
        weight_decay=adam_weight_decay,
        nu_dtype=nu_dtype,
    )
    return _with_adam_fallback("soap", matrices, rest)
