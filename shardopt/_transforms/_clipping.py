"""Clipping of update values and of their global norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._base import AbstractCountingTransform, Params, Updates
from .._hyperparams import (
    NONNEGATIVE,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import global_norm


class Clip(AbstractCountingTransform):
    """Clip every update value to ``[-max_delta, max_delta]``."""

    max_delta: Hyperparameter = hyperparameter("max_delta", NONNEGATIVE)

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        del params
        bound = resolve(self.max_delta, count, name="max_delta")
        return jax.tree.map(
            lambda g: jnp.clip(g, (-bound).astype(g.dtype), bound.astype(g.dtype)),
            grads,
        )


class ClipByGlobalNorm(AbstractCountingTransform):
    """Rescale the updates so that their global L2 norm is at most ``max_norm``.

    Pascanu et al., "On the difficulty of training recurrent neural networks",
    ICML 2013.
    """

    max_norm: Hyperparameter = hyperparameter("max_norm", NONNEGATIVE)

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        del params
        max_norm = resolve(self.max_norm, count, name="max_norm")
        norm = global_norm(grads)
        keep = norm < max_norm.astype(norm.dtype)

        def clip(g):
            scaled = (g / norm.astype(g.dtype)) * max_norm.astype(g.dtype)
            return jax.lax.select(keep, g, scaled)

        return jax.tree.map(clip, grads)


def clip(max_delta: ScalarOrSchedule) -> Clip:
    """Clip updates element-wise to ``[-max_delta, max_delta]``."""
    return Clip(max_delta)


def clip_by_global_norm(max_norm: ScalarOrSchedule) -> ClipByGlobalNorm:
    """Scale updates down so their global norm does not exceed ``max_norm``."""
    return ClipByGlobalNorm(max_norm)
