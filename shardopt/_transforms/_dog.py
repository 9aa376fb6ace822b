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
from .._tree_math import add, canonical_dtype, cast, copied, promote, squared_norm
from ._dtypes import tree_dtype

NEEDS_PARAMS = "{name} needs the parameters: call update(grads, state, params)."
NO_PARAMS = NEEDS_PARAMS.format(name="scale_by_distance_over_gradients")


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
        start = copied(cast(params, self.param_dtype))

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


# --- optax.contrib's DoG and DoWG: one step size for the whole tree -----------

INIT_STEP_TYPES = ("distance", "learning_rate", "heuristic")


def scalar_dtypes(params: Params) -> tuple[jnp.dtype, jnp.dtype]:
    """The parameters' lowest and highest dtypes.

    optax.contrib starts its scalar state (distances, sums) in the lowest dtype
    and, on a tree that mixes dtypes, it becomes the highest after the first
    step (a sum over all leaves promotes it). shardopt keeps it in the highest
    dtype from the start, with the initial value rounded to the lowest: the
    same numbers, and a state whose dtypes never change.
    """
    return tree_dtype(params, "lowest"), tree_dtype(params, "highest")


def _scale_tree(rate: Array, grads: Updates) -> Updates:
    def one(g):
        r, g = promote(rate, g)
        return r * g

    return jax.tree.map(one, grads)


class DoGState(eqx.Module):
    count: Array
    is_init_step: Array  # bool: no step taken yet
    init_params: Updates  # the starting parameters
    max_dist: Array  # the largest ||x_t - x_0|| so far (a scalar)
    sum_sq_norm_grads: Array  # sum over steps of ||g||^2 (a scalar)


class ScaleByDoG(AbstractTransform):
    """DoG over the whole tree: ``u = max_dist / sqrt(sum ||g||^2 + eps) * g``.

    ``max_dist`` is the largest distance ``||x_t - x_0||`` (over all leaves
    together) so far, starting at ``init_step``: ``("distance", r)`` starts it
    at ``r``, ``("heuristic", r)`` at ``r (1 + ||x_0||)``, and
    ``("learning_rate", lr)`` at 0 with ``lr`` as the first step size. The
    sign is left to the learning rate that follows (see :func:`dog`).

    Ivgi, Hinder & Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic
    Step Size Schedule", ICML 2023.
    """

    init_step_value: Hyperparameter = hyperparameter("init_step_value", NONNEGATIVE)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    init_step_type: str = eqx.field(static=True)

    def __check_init__(self):
        if self.init_step_type not in INIT_STEP_TYPES:
            raise ValueError(
                f"init_step's type must be one of {INIT_STEP_TYPES}, got "
                f"{self.init_step_type!r}"
            )

    def init(self, params: Params) -> DoGState:
        low, high = scalar_dtypes(params)
        value = resolve(self.init_step_value, zero_count(), name="init_step_value")
        if self.init_step_type == "distance":
            r = value
        elif self.init_step_type == "heuristic":
            norm = jnp.sqrt(squared_norm(params))
            r = value.astype(norm.dtype) * (1 + norm)
        else:
            r = jnp.zeros([], high)
        return DoGState(
            zero_count(),
            jnp.asarray(True),
            copied(params),
            r.astype(low).astype(high),
            jnp.zeros([], high),
        )

    def update(
        self, grads: Updates, state: DoGState, params: Params | None = None
    ) -> tuple[Updates, DoGState]:
        if params is None:
            raise ValueError(NEEDS_PARAMS.format(name="dog"))
        eps = resolve(self.eps, state.count, name="eps")
        dtype = state.max_dist.dtype
        distance = jnp.sqrt(squared_norm(jax.tree.map(_sub, state.init_params, params)))
        max_dist = jnp.maximum(state.max_dist, distance.astype(dtype))
        sums = state.sum_sq_norm_grads + squared_norm(grads).astype(dtype)
        rate = max_dist / jnp.sqrt(sums + eps.astype(dtype))
        if self.init_step_type == "learning_rate":
            value = resolve(self.init_step_value, state.count, name="init_step_value")
            rate = jnp.where(state.is_init_step, value.astype(dtype), rate)
        new_state = DoGState(
            safe_increment(state.count),
            jnp.asarray(False),
            state.init_params,
            max_dist,
            sums,
        )
        return _scale_tree(rate, grads), new_state


def _sub(a: Array, b: Array) -> Array:
    a, b = promote(a, b)
    return a - b


class DoWGState(eqx.Module):
    count: Array
    init_params: Updates  # the starting parameters
    weighted_sq_norm_grads: Array  # sum over steps of r_t^2 ||g_t||^2 (a scalar)
    estim_sq_dist: Array  # r_t^2: the largest ||x_t - x_0||^2 so far (a scalar)


class ScaleByDoWG(AbstractTransform):
    """DoWG: ``u = r^2 / (sqrt(sum_t r_t^2 ||g_t||^2) + eps) * g``.

    ``r^2`` is the largest squared distance ``||x_t - x_0||^2`` so far, starting
    at ``init_estim_sq_dist`` (``eps`` when None). The sign is left to the
    learning rate that follows (see :func:`dowg`).

    Khaled, Mishchenko & Jin, "DoWG Unleashed: An Efficient Universal
    Parameter-Free Gradient Descent Method", NeurIPS 2023.
    """

    init_estim_sq_dist: Hyperparameter = hyperparameter(
        "init_estim_sq_dist", NONNEGATIVE
    )
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)

    def init(self, params: Params) -> DoWGState:
        low, high = scalar_dtypes(params)
        r2 = resolve(self.init_estim_sq_dist, zero_count(), name="init_estim_sq_dist")
        return DoWGState(
            zero_count(),
            copied(params),
            jnp.zeros([], high),
            r2.astype(low).astype(high),
        )

    def update(
        self, grads: Updates, state: DoWGState, params: Params | None = None
    ) -> tuple[Updates, DoWGState]:
        if params is None:
            raise ValueError(NEEDS_PARAMS.format(name="dowg"))
        eps = resolve(self.eps, state.count, name="eps")
        dtype = state.estim_sq_dist.dtype
        distance = squared_norm(jax.tree.map(_sub, state.init_params, params))
        r2 = jnp.maximum(state.estim_sq_dist, distance.astype(dtype))
        weighted = r2 * squared_norm(grads).astype(dtype) + state.weighted_sq_norm_grads
        rate = r2 / (jnp.sqrt(weighted) + eps.astype(dtype))
        new_state = DoWGState(
            safe_increment(state.count), state.init_params, weighted, r2
        )
        return _scale_tree(rate, grads), new_state


def scale_by_dog(
    init_step: tuple[str, ScalarOrSchedule] = ("heuristic", 1e-6),
    eps: ScalarOrSchedule = 1e-8,
) -> ScaleByDoG:
    """Rescale updates by global DoG's step size (unsigned)."""
    init_step_type, init_step_value = init_step
    return ScaleByDoG(init_step_value, eps, init_step_type)


def scale_by_dowg(
    init_estim_sq_dist: ScalarOrSchedule | None = None,
    eps: ScalarOrSchedule = 1e-4,
) -> ScaleByDoWG:
    """Rescale updates by DoWG's step size (unsigned)."""
    if init_estim_sq_dist is None:
        init_estim_sq_dist = eps
    return ScaleByDoWG(init_estim_sq_dist, eps)
