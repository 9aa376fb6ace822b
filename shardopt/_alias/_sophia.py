"""Sophia: a light second-order optimizer with a clipped Hessian preconditioner."""

from __future__ import annotations

from typing import Any

from jax.typing import DTypeLike

from .._hyperparams import ScalarOrSchedule
from .._transforms._combinators import Chain, chain
from .._transforms._decay import add_decayed_weights
from .._transforms._scale import scale_by_learning_rate
from .._transforms._sophia import scale_by_sophia
from ._types import Mask


def sophia(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.965,
    b2: float = 0.99,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    weight_decay_mask: Mask = None,
    gamma: float = 0.01,
    clip_threshold: float | None = 1.0,
    update_interval: int = 10,
    hessian_diagonal_fn: Any = None,
    mu_dtype: Any = None,
    verbose: bool = False,
    print_win_rate_every_n_steps: int = 0,
    *,
    nu_dtype: DTypeLike | None = None,
) -> Chain:
    """Sophia: momentum divided by a moving average of the Hessian's diagonal.

    The default estimator (Hutchinson's) needs the objective at every step:
    ``opt.step(params, grads, obj_fn=lambda p: loss(p, batch))``. Any extra
    keyword of ``step`` reaches ``hessian_diagonal_fn``. The effective ``b2``
    is ``1 - (1 - b2) / update_interval``. Liu et al., "Sophia: A Scalable
    Stochastic Second-order Optimizer for Language Model Pre-training", ICLR
    2024. ``mu_dtype`` (optax's) stores the momentum narrower, ``nu_dtype`` the
    Hessian's moving average (see :func:`scale_by_sophia`).
    """
    return chain(
        scale_by_sophia(
            b1,
            b2,
            eps,
            gamma,
            clip_threshold,
            update_interval,
            hessian_diagonal_fn,
            mu_dtype,
            verbose,
            print_win_rate_every_n_steps,
            nu_dtype=nu_dtype,
        ),
        add_decayed_weights(weight_decay, weight_decay_mask),
        scale_by_learning_rate(learning_rate),
    )
