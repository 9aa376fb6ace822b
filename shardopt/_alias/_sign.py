"""Sign-based optimizers: Lion."""

from __future__ import annotations

from jax.typing import DTypeLike

from .._hyperparams import ScalarOrSchedule
from .._transforms._combinators import Chain, chain
from .._transforms._decay import add_decayed_weights
from .._transforms._scale import scale_by_learning_rate
from .._transforms._sign import scale_by_lion
from ._types import Mask


def lion(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.99,
    mu_dtype: DTypeLike | None = None,
    weight_decay: ScalarOrSchedule = 1e-3,
    mask: Mask = None,
) -> Chain:
    """Lion. Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023."""
    return chain(
        scale_by_lion(b1, b2, mu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
