"""Piecewise schedules that glide (linearly or along a cosine) between values."""

from __future__ import annotations

import math
from typing import Literal

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .._hyperparams import AbstractSchedule, hyperparameter
from ._args import step_count

InterpolateType = Literal["linear", "cosine"]
INTERPOLATE_TYPES = ("linear", "cosine")


def check_interpolate_type(value: str) -> str:
    """``value`` if it names a known interpolation, else a ValueError naming it."""
    if value not in INTERPOLATE_TYPES:
        raise ValueError(
            f"interpolate_type must be 'linear' or 'cosine', got {value!r}"
        )
    return value


def _between(kind: str, start: Array, end: Array, pct: Array) -> Array:
    if kind == "linear":
        return (end - start) * pct + start
    return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1)


def interpolate(
    kind: str, boundaries: tuple[Array, ...], values: Array, count: ArrayLike
) -> Array:
    """Glide from ``values[i]`` at ``boundaries[i - 1]`` to ``values[i + 1]``.

    The first segment starts at step 0; from the last boundary on the value is
    ``values[-1]``. ``pct`` is the fraction of the segment covered (a segment of
    length 0 counts as length 1).
    """
    count = jnp.asarray(count)
    bounds = jnp.stack((jnp.zeros([], jnp.int32), *boundaries))
    sizes = jnp.maximum(bounds[1:] - bounds[:-1], 1)
    inside = (bounds[:-1] <= count) & (count < bounds[1:])
    pct = ((count - bounds[:-1]) / sizes).astype(values.dtype)
    glided = _between(kind, values[:-1], values[1:], pct)
    within = jnp.sum(jnp.where(inside, glided, jnp.zeros([], values.dtype)))
    after = jnp.where(bounds[-1] <= count, values[-1], jnp.zeros([], values.dtype))
    return within + after


class PiecewiseInterpolate(AbstractSchedule):
    """``init_value`` times the running product of the scales, interpolated.

    At ``boundaries[i]`` the value is ``init_value * scales[0] * ... * scales[i]``;
    between two boundaries it moves linearly, or along half a cosine, from one
    such value to the next.
    """

    interpolate_type: str = eqx.field(static=True, converter=check_interpolate_type)
    init_value: Array = hyperparameter("init_value")
    boundaries: tuple[Array, ...]
    scales: tuple[Array, ...]

    def __call__(self, count: ArrayLike) -> Array:
        values = jnp.cumprod(jnp.stack((self.init_value, *self.scales)))
        return interpolate(self.interpolate_type, self.boundaries, values, count)


def piecewise_interpolate_schedule(
    interpolate_type: InterpolateType,
    init_value: float,
    boundaries_and_scales: dict[int, float] | None = None,
) -> PiecewiseInterpolate:
    """Interpolate between ``init_value`` and its products with successive scales.

    With the boundaries sorted, ``v_0 = init_value`` and ``v_i = v_{i-1} * s_i``
    at boundary ``b_i``; for ``b_i <= t < b_{i+1}`` (``b_0 = 0``) and
    ``p = (t - b_i) / (b_{i+1} - b_i)``, linear gives ``v_i + p (v_{i+1} - v_i)``
    and cosine gives ``v_{i+1} + (v_i - v_{i+1}) (1 + cos(pi p)) / 2``; after the
    last boundary the value stays at the last product.
    """
    check_interpolate_type(interpolate_type)
    items = sorted((boundaries_and_scales or {}).items())
    boundaries, scales = [], []
    for boundary, scale in items:
        where = f"boundaries_and_scales[{boundary!r}]"
        boundaries.append(step_count(boundary, f"the boundary {boundary!r}"))
        try:
            scale = float(scale)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where} must be a number, got {scale!r}") from err
        if not (math.isfinite(scale) and scale >= 0.0):
            raise ValueError(f"{where} = {scale!r}: scales must be finite and >= 0")
        scales.append(jnp.asarray(scale, jnp.float32))
    return PiecewiseInterpolate(
        interpolate_type, init_value, tuple(boundaries), tuple(scales)
    )
