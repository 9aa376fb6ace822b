"""The matrix optimizers: Muon (with its AdamW fallback), Shampoo and SOAP."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
from jax.typing import DTypeLike

from .._hyperparams import ScalarOrSchedule
from .._transforms._combinators import chain
from .._transforms._decay import add_decayed_weights
from .._transforms._muon import (
    DEFAULT_NS_COEFFS,
    WeightDimNumbers,
    dimension_numbers_of,
    scale_by_muon,
    scale_by_shape,
    static_dimension_numbers,
)
from .._transforms._partition import Partition
from .._transforms._scale import scale_by_learning_rate
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
) -> Partition:
    """Muon: momentum orthogonalized by Newton-Schulz, AdamW for the rest.

    optax.contrib.muon's arguments and numbers. The matrices (2-D leaves, or
    those ``muon_weight_dimension_numbers`` gives; None there sends a leaf to
    AdamW) get :func:`scale_by_muon`, :func:`scale_by_shape`, weight decay
    and the learning rate; every other leaf gets
    ``adamw(adam_learning_rate or learning_rate, adam_b1, adam_b2, eps,
    adam_eps_root, mu_dtype, adam_weight_decay, nesterov=nesterov)``. Under a
    ZeRO plan each device orthogonalizes whole matrices, its share of them
    (see docs/matrix.md).

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
    )
    return Partition(
        ("muon", "adam"),
        (matrices, rest),
        MuonLabels(dims),
        allow_unused=True,
    )
