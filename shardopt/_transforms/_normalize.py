"""Normalising transforms: gradient centralisation and unit-norm updates."""

from __future__ import annotations

import jax
from jaxtyping import Array

from .._base import (
    AbstractCountingTransform,
    AbstractStatelessTransform,
    EmptyState,
    Params,
    Updates,
)
from .._hyperparams import (
    NONNEGATIVE,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import global_norm, promote


class Centralize(AbstractStatelessTransform):
    """Subtract from each update of 2+ dims its mean over all dims but the first.

    Yong et al., "Gradient Centralization: A New Optimization Technique for
    Deep Neural Networks", ECCV 2020.
    """

    def apply(self, grads: Updates, params: Params | None) -> Updates:
        del params
        return jax.tree.map(_centre, grads)


def _centre(g: Array) -> Array:
    if g.ndim < 2:
        return g
    return g - g.mean(axis=tuple(range(1, g.ndim)), keepdims=True)


def centralize() -> Centralize:
    """Gradient centralisation: ``u = g - mean(g, axes 1..ndim-1)`` for 2+ dims.

    Scalars and vectors pass through. Yong et al., "Gradient Centralization: A
    New Optimization Technique for Deep Neural Networks", ECCV 2020.
    """
    return Centralize()


class NormalizeByUpdateNorm(AbstractCountingTransform):
    """Divide the updates by their global norm: ``u = s * g / (||g|| + eps)``.

    Each quotient is taken in the dtype of the leaf promoted with the norm, and
    returned in it, as optax does: in a tree that mixes bfloat16 and float32
    leaves the bfloat16 updates come back in float32, which
    :func:`~shardopt.apply_updates` rounds once to the parameter's dtype.
    """

    scale_factor: Hyperparameter = hyperparameter("scale_factor")
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        del params
        scale_factor = resolve(self.scale_factor, count, name="scale_factor")
        eps = resolve(self.eps, count, name="eps")
        norm = global_norm(grads)
        denominator = (norm + eps.astype(norm.dtype)) / scale_factor.astype(norm.dtype)

        def one(g):
            g, d = promote(g, denominator)
            return g / d

        return jax.tree.map(one, grads)


def normalize_by_update_norm(
    scale_factor: ScalarOrSchedule = 1.0, eps: ScalarOrSchedule = 1e-6
) -> NormalizeByUpdateNorm:
    """Scale the updates to global norm ``scale_factor``: ``s * g / (||g|| + eps)``.

    ``eps`` keeps a zero gradient finite; a negative ``scale_factor`` makes it a
    descent step on its own.
    """
    return NormalizeByUpdateNorm(scale_factor, eps)


NormalizeState = EmptyState
"""The state of :func:`normalize`: nothing (optax.contrib's name for it)."""


class Normalize(AbstractStatelessTransform):
    """Divide the updates by their global norm: ``u = g / ||g||``.

    No epsilon, as optax.contrib (a zero gradient gives NaN): SAM's adversarial
    direction. Each quotient is in the leaf's dtype promoted with the norm's.

    Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for
    Efficiently Improving Generalization", ICLR 2021.
    """

    def apply(self, grads: Updates, params: Params | None) -> Updates:
        del params
        norm = global_norm(grads)

        def one(g):
            g, n = promote(g, norm)
            return g / n

        return jax.tree.map(one, grads)


def normalize() -> Normalize:
    """Scale the updates to unit global norm, ``g / ||g||`` (optax.contrib's)."""
    return Normalize()
