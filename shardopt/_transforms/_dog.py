"""Distance over gradients (DoG): a step size from how far the parameters moved."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._hyperparams import (
    NONNEGATIVE,
    POSITIVE,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import add, canonical_dtype, cast, promote

NO_PARAMS = (
    "scale_by_distance_over_gradients needs the parameters: call "
    "update(grads, state, params)."
)


def _l2(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(x)))


def _rounded_as(x: Array, dtype: jnp.dtype) -> Array:
    """``x`` rounded to ``dtype``'s precision but kept in its own dtype.

    ``reduce_precision`` is not folded away by XLA, unlike a pair of casts.
    """
    if jnp.finfo(dtype).bits >= jnp.finfo(x.dtype).bits:
        return x
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, info.nexp, info.nmant)


def _promoted(*dtypes: jnp.dtype) -> jnp.dtype:
    with jax.numpy_dtype_promotion("standard"):
        out = dtypes[0]
        for dtype in dtypes[1:]:
            out = jnp.promote_types(out, dtype)
    return out


class ScaleByDistanceOverGradientsState(eqx.Module):
    count: Array
    max_dist: Updates  # per leaf: the largest distance from the start (scalar)
    grad_sum_of_squares: Updates  # per leaf: the running sum of ||g||^2 (scalar)
    init_params: Updates  # the starting parameters, in param_dtype


class ScaleByDistanceOverGradients(AbstractTransform):
    """Layer-wise DoG: ``u = s * max_dist / sqrt(sum ||g||^2 + eps) * g``.

    Per parameter leaf, ``max_dist`` is the largest ``||x_t - x_0||`` so far,
    starting at ``reps_rel * (1 + ||x_0||)``; the sum runs over all gradients
    so far, this one included. ``global_scale`` is ``s`` (``-1`` for descent).
    For a bfloat16 leaf the norms and sums are taken in float32, then rounded
    to bfloat16 where optax computes in bfloat16 (the initial distance, each
    step's squared gradient norm): optax's numbers, the same in every ZeRO
    layout.

    Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic
    Step Size Schedule", ICML 2023.
    """

    reps_rel: Hyperparameter = hyperparameter("reps_rel", POSITIVE)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    global_scale: Hyperparameter = hyperparameter("global_scale")
    param_dtype: jnp.dtype | None = eqx.field(static=True)

    def init(self, params: Params) -> ScaleByDistanceOverGradientsState:
        reps_rel = resolve(self.reps_rel, zero_count(), name="reps_rel")
        start = cast(params, self.param_dtype)

        def initial_distance(p, s):
            # Computed in the dtype the distances to ``s`` will have (float32
            # for bfloat16 parameters) and rounded explicitly: XLA may keep
            # bfloat16 intermediates in float32, differently in each layout,
            # so bfloat16 arithmetic would differ between ZeRO stages.
            dtype = _promoted(p.dtype, s.dtype)
            d = reps_rel.astype(dtype) * (1 + _l2(p.astype(dtype)))
            return _rounded_as(d, p.dtype)

        def zero_sum(p):
            return jnp.zeros([], _promoted(canonical_dtype(jnp.float64), p.dtype))

        return ScaleByDistanceOverGradientsState(
            zero_count(),
            jax.tree.map(initial_distance, params, start),
            jax.tree.map(zero_sum, params),
            start,
        )

    def update(
        self,
        grads: Updates,
        state: ScaleByDistanceOverGradientsState,
        params: Params | None = None,
    ) -> tuple[Updates, ScaleByDistanceOverGradientsState]:
        if params is None:
            raise ValueError(NO_PARAMS)
        eps = resolve(self.eps, state.count, name="eps")
        scale = resolve(self.global_scale, state.count, name="global_scale")

        def distance(d, p, p0):
            p, p0 = promote(p, p0)
            return jnp.maximum(d, _l2(p - p0).astype(d.dtype))

        max_dist = jax.tree.map(distance, state.max_dist, params, state.init_params)
        sums = jax.tree.map(
            lambda s, g: add(
                s, _rounded_as(jnp.sum(jnp.square(promote(g, s)[0])), g.dtype)
            ),
            state.grad_sum_of_squares,
            grads,
        )

        def step(g, d, s):
            d, s = promote(d, s)
            rate = scale.astype(d.dtype) * (d / jnp.sqrt(s + eps.astype(s.dtype)))
            rate, g = promote(rate, g)
            return rate * g

        updates = jax.tree.map(step, grads, max_dist, sums)
        new_state = ScaleByDistanceOverGradientsState(
            safe_increment(state.count), max_dist, sums, state.init_params
        )
        return updates, new_state


def scale_by_distance_over_gradients(
    reps_rel: ScalarOrSchedule = 1e-6,
    eps: ScalarOrSchedule = 1e-8,
    param_dtype: DTypeLike | None = jnp.float32,
    global_scale: ScalarOrSchedule = 1.0,
) -> ScaleByDistanceOverGradients:
    """Rescale updates by layer-wise DoG's distance-over-gradients step size.

    The starting parameters are stored in ``param_dtype`` (their own dtype
    when None).
    """
    return ScaleByDistanceOverGradients(
        reps_rel, eps, global_scale, canonical_dtype(param_dtype, "param_dtype")
    )
