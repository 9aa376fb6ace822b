"""Per-block rescaling: each parameter (a weight matrix, a vector) is one block.

Every transform here reduces a whole leaf, or a few of its dims, to a norm and
rescales the leaf by it. On a partitioned parameter the math is unchanged:
GSPMD sums the squares of each shard locally and adds one all-reduce of the
reduced (small) result over the devices that hold the partitioned dims.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._base import AbstractCountingTransform, Params, Updates
from .._hyperparams import (
    NONNEGATIVE,
    POSITIVE,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import promote

Axis = int | tuple[int, ...] | None

# The floor of the gradient norm in adaptive_grad_clip's ratio: it only guards
# the division (a zero gradient is never clipped anyway), as in optax.
_DIVISION_FLOOR = 1e-6


def _rms(x: Array) -> Array:
    """``sqrt(mean(x ** 2))`` over the whole leaf, in the leaf's dtype."""
    return jnp.sqrt(jnp.mean(x * x))


class ClipByBlockRms(AbstractCountingTransform):
    """Scale each leaf down so that its root mean square is at most ``threshold``.

    ``u <- u / max(1, rms(u) / threshold)`` with ``rms(u) = sqrt(mean(u**2))``
    over the whole leaf. Shazeer & Stern, "Adafactor: Adaptive Learning Rates
    with Sublinear Memory Cost", ICML 2018 (update clipping).

    Partitioned parameter: one all-reduce of a scalar (the sum of squares) per
    partitioned leaf and step; nothing is gathered.
    """

    threshold: Hyperparameter = hyperparameter("threshold", POSITIVE)

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        del params
        threshold = resolve(self.threshold, count, name="threshold")

        def clip(u):
            denominator = jnp.maximum(1.0, _rms(u) / threshold.astype(u.dtype))
            return u / denominator

        return jax.tree.map(clip, grads)


def _unit_axes(shape: tuple[int, ...], axis: Axis) -> tuple[int, ...]:
    """The dims a unit-wise norm reduces: given, or by the layer conventions.

    Vectors (and leaves with at most one dim above size 1) are one unit;
    matrices ``(in, out)`` and multi-head ``(in, heads, out)`` weights reduce
    dim 0; convolution kernels ``(H, W, in, out)`` and ``(D, H, W, in, out)``
    reduce every dim but the last.
    """
    if axis is not None:
        return (axis,) if isinstance(axis, int) else tuple(axis)
    if sum(n != 1 for n in shape) <= 1:
        return tuple(range(len(shape)))
    if len(shape) in (2, 3):
        return (0,)
    if len(shape) in (4, 5):
        return tuple(range(len(shape) - 1))
    raise ValueError(
        f"adaptive_grad_clip has no default unit for a leaf of shape {shape} "
        f"(it knows 1 to 5 dims); pass axis=... to name the dims to reduce"
    )


def _unit_norm(x: Array, axes: tuple[int, ...]) -> Array:
    """The L2 norm of each unit, with the reduced dims kept with size 1."""
    return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=True))


class AdaptiveGradClip(AbstractCountingTransform):
    """Clip each unit's update to ``clipping`` times its parameter's norm (AGC).

    Per unit (a slice of the leaf, see ``axis``):
    ``g <- g * clipping * max(|p|, eps) / |g|`` where
    ``|g| >= clipping * max(|p|, eps)``, and ``g`` unchanged elsewhere.
    Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image
    Recognition Without Normalization", ICML 2021.

    Partitioned parameter: the unit norms of the update and of the parameter
    are sums over the reduced dims; where one of those is partitioned, GSPMD
    all-reduces the two norm arrays (each the leaf's size divided by the
    reduced dims' sizes). A partitioned kept dim needs nothing.
    """

    clipping: Hyperparameter = hyperparameter("clipping", NONNEGATIVE)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    axis: Axis = eqx.field(static=True)

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        if params is None:
            raise ValueError(
                "adaptive_grad_clip needs the parameters: call "
                "update(grads, state, params)."
            )
        clipping = resolve(self.clipping, count, name="clipping")
        eps = resolve(self.eps, count, name="eps")

        def clip(g, p):
            axes = _unit_axes(tuple(p.shape), self.axis)
            limit = clipping.astype(p.dtype) * jnp.maximum(
                _unit_norm(p, axes), eps.astype(p.dtype)
            )
            norm = _unit_norm(g, axes)
            # promoted as optax's standard promotion would (g and p may differ)
            ratio = jnp.divide(*promote(limit, jnp.maximum(norm, _DIVISION_FLOOR)))
            clipped = jnp.multiply(*promote(g, ratio))
            keep = jnp.less(*promote(norm, limit))
            return jnp.where(keep, *promote(g, clipped))

        return jax.tree.map(clip, grads, params)


def _check_axis(axis: Any) -> Axis:
    if axis is None or (isinstance(axis, int) and not isinstance(axis, bool)):
        return axis
    if isinstance(axis, (tuple, list)) and all(
        isinstance(a, int) and not isinstance(a, bool) for a in axis
    ):
        return tuple(axis)
    raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")


def clip_by_block_rms(threshold: ScalarOrSchedule) -> ClipByBlockRms:
    """Scale each leaf down so its root mean square does not exceed ``threshold``."""
    return ClipByBlockRms(threshold)


def adaptive_grad_clip(
    clipping: ScalarOrSchedule,
    eps: ScalarOrSchedule = 1e-3,
    axis: Axis = None,
) -> AdaptiveGradClip:
    """Clip updates unit-wise to ``clipping`` times the parameter's unit norm."""
    return AdaptiveGradClip(clipping, eps, _check_axis(axis))
