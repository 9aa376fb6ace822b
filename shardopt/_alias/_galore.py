"""GaLore: low-rank projected Adam with decoupled weight decay."""

from __future__ import annotations

from typing import Any

from .._hyperparams import ScalarOrSchedule
from .._transforms._combinators import Chain, chain
from .._transforms._decay import add_decayed_weights
from .._transforms._galore import scale_by_galore
from .._transforms._scale import scale_by_learning_rate
from ._types import Mask


def galore(
    learning_rate: ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    base_optimizer: Any = None,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Mask | None = None,
    weight_dimension_numbers: Any = None,
) -> Chain:
    """GaLore: the base optimizer (Adam) on low-rank gradients, decay in full space.

    ``scale_by_galore`` (see there), then ``add_decayed_weights(weight_decay,
    mask)`` and the learning rate. Zhao et al., "GaLore: Memory-Efficient LLM
    Training by Gradient Low-Rank Projection", ICML 2024.
    """
    return chain(
        scale_by_galore(
            rank, update_proj_gap, scale, base_optimizer, weight_dimension_numbers
        ),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
