"""Schedule-Free SGD and AdamW: the base optimizers of optax.contrib, wrapped."""

from __future__ import annotations

import jax.numpy as jnp
from jax.typing import DTypeLike

from .._base import identity
from .._hyperparams import ScalarOrSchedule
from .._schedules._warmup import warmup_constant_schedule
from .._transforms._combinators import chain
from .._transforms._decay import add_decayed_weights
from .._transforms._rms import scale_by_rms
from .._transforms._scale import scale_by_learning_rate
from .._transforms._schedule_free import ScheduleFree, schedule_free


def _with_warmup(learning_rate: float, warmup_steps: int | None) -> ScalarOrSchedule:
    if warmup_steps is None:
        return learning_rate
    return warmup_constant_schedule(0.0, learning_rate, warmup_steps)


def schedule_free_sgd(
    learning_rate: float = 1.0,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    weight_decay: float | None = None,
    weight_lr_power: float = 2.0,
    state_dtype: jnp.dtype | str | None = None,
) -> ScheduleFree:
    """Schedule-Free SGD: plain SGD (coupled weight decay) made schedule-free.

    ``warmup_steps`` warms the learning rate up linearly from 0. Defazio et
    al., "The Road Less Scheduled", NeurIPS 2024.
    """
    learning_rate = _with_warmup(learning_rate, warmup_steps)
    optimizer = chain(identity(), scale_by_learning_rate(learning_rate))
    if weight_decay is not None:
        optimizer = chain(add_decayed_weights(weight_decay), optimizer)
    return schedule_free(optimizer, learning_rate, b1, weight_lr_power, state_dtype)


def schedule_free_adamw(
    learning_rate: float = 0.0025,
    warmup_steps: int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_lr_power: float = 2.0,
    state_dtype: jnp.dtype | str | None = None,
    *,
    nu_dtype: DTypeLike | None = None,
) -> ScheduleFree:
    """Schedule-Free AdamW: bias-corrected RMS scaling, decoupled weight decay.

    The base optimizer is AdamW without momentum (``scale_by_rms`` with
    ``eps`` outside the root and bias correction, as optax has it). Defazio et
    al., "The Road Less Scheduled", NeurIPS 2024. ``state_dtype`` (optax's)
    stores ``z``; ``nu_dtype`` stores the second moment (updated in float32,
    rounded once), as :func:`scale_by_rms`'s.
    """
    learning_rate = _with_warmup(learning_rate, warmup_steps)
    optimizer = chain(
        scale_by_rms(
            b2, eps, eps_in_sqrt=False, bias_correction=True, nu_dtype=nu_dtype
        ),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(learning_rate),
    )
    return schedule_free(optimizer, learning_rate, b1, weight_lr_power, state_dtype)
