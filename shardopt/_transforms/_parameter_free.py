"""Step sizes without tuning: COCOB's coin betting, D-Adaptation and Prodigy.

Each estimates the distance to the solution (or bets on it) instead of taking a
learning rate; the learning rate, where there is one, is a multiplier (1 by
default).
"""

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
    UNIT_INTERVAL,
    Hyperparameter,
    ScalarOrSchedule,
    as_hyperparameter,
    hyperparameter,
    resolve,
)
from .._tree_math import (
    add,
    canonical_dtype,
    cast_like,
    copied,
    full_like,
    promote,
    storage_dtype_field,
    vdot,
    widened,
    zeros_like,
)
from ._dog import NEEDS_PARAMS, scalar_dtypes
from ._dog import _rounded_as as rounded_as


def _scaled(scalar: Array, leaf: Array) -> Array:
    """``scalar * leaf`` in the pair's promoted dtype."""
    scalar, leaf = promote(scalar, leaf)
    return scalar * leaf


def _first_step_rounding(params: Params, count: Array):
    """A function that rounds a scalar to the parameters' lowest dtype on the
    first step only.

    optax.contrib starts ``estim_lr`` in the lowest dtype, so on a tree that
    mixes bfloat16 and float32 its first step's scalar arithmetic (``d lr``,
    ``dlr``, ...) runs in bfloat16; from the second step on it is float32 (a
    sum over all leaves promotes it). shardopt keeps the scalars in the highest
    dtype and rounds where optax's first step does: the same numbers, stable
    state dtypes. On a tree of one dtype this is the identity.
    """
    low, high = scalar_dtypes(params)
    if low == high:
        return lambda x: x
    first = count == 0
    return lambda x: jnp.where(first, rounded_as(x, low), x)


def _settled_zeros(params: Params) -> Updates:
    """Zeros for an accumulator that optax lets settle into the highest dtype.

    optax's step-scaled accumulators take the scalars' dtype from the second
    step on (float32 for a bfloat16 leaf in a mixed tree); shardopt stores
    them in that dtype from the start, with the first step's values rounded to
    the leaf's dtype (see :func:`_first_step_rounding`).
    """
    _, high = scalar_dtypes(params)

    def zeros(p):
        with jax.numpy_dtype_promotion("standard"):
            return jnp.zeros(p.shape, jnp.promote_types(p.dtype, high))

    return jax.tree.map(zeros, params)


def _stored_zeros(params: Params, dtype: jnp.dtype | None) -> Updates:
    """Zeros in a storage ``dtype`` when one is given, else settled ones."""
    return _settled_zeros(params) if dtype is None else zeros_like(params, dtype)


def _first_step_leaf_rounding(count: Array):
    """On the first step only, round ``x`` to ``dtype`` (a no-op for wider dtypes)."""
    first = count == 0
    return lambda x, dtype: jnp.where(first, rounded_as(x, dtype), x)


def _divide(a: Array, b: Array) -> Array:
    a, b = promote(a, b)
    return a / b


def _l1(tree: Updates) -> Array:
    total = jnp.zeros([], jnp.int32)
    for leaf in jax.tree.leaves(tree):
        total = add(total, jnp.sum(jnp.abs(leaf)))
    return total


class COCOBState(eqx.Module):
    count: Array
    init_particles: Updates  # the starting parameters
    cumulative_gradients: Updates  # minus the sum of the gradients
    scale: Updates  # the largest |g| seen, per element (starts at eps)
    subgradients: Updates  # the sum of |g|, per element
    reward: Updates  # the wealth won so far, per element


class ScaleByCocob(AbstractTransform):
    """COCOB-Backprop: each coordinate bets a fraction of its wealth on the sign.

    ``x = x0 + C / (L max(G + L, alpha L)) (L + R)``, with ``C = -sum g``,
    ``G = sum |g|``, ``L = max |g|`` (from ``eps``) and the reward
    ``R = max(R - g (x - x0), 0)``; the update moves the parameters there.

    Orabona & Tommasi, "Training Deep Networks without Learning Rates Through
    Coin Betting", NeurIPS 2017.

    ``accumulator_dtype`` stores ``C``, ``L``, ``G`` and ``R``: they are
    updated and used in float32 and rounded once when stored; ``x0`` stays in
    the parameters' dtype.
    """

    alpha: Hyperparameter = hyperparameter("alpha", POSITIVE)
    eps: Hyperparameter = hyperparameter("eps", POSITIVE)
    accumulator_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> COCOBState:
        eps = resolve(self.eps, zero_count(), name="eps")
        dtype = self.accumulator_dtype
        return COCOBState(
            zero_count(),
            copied(params),
            zeros_like(params, dtype),
            full_like(params, eps, dtype),
            zeros_like(params, dtype),
            zeros_like(params, dtype),
        )

    def update(
        self, grads: Updates, state: COCOBState, params: Params | None = None
    ) -> tuple[Updates, COCOBState]:
        if params is None:
            raise ValueError(NEEDS_PARAMS.format(name="scale_by_cocob"))
        alpha = resolve(self.alpha, state.count, name="alpha")
        wide = lambda tree: widened(tree, self.accumulator_dtype)
        grads_ = wide(grads)
        scale = jax.tree.map(
            lambda s, g: jnp.maximum(s, jnp.abs(g)), wide(state.scale), grads_
        )
        subgradients = jax.tree.map(
            lambda s, g: s + jnp.abs(g), wide(state.subgradients), grads_
        )
        reward = jax.tree.map(
            lambda r, g, p, p0: jnp.maximum(r - g * (p - p0), jnp.zeros_like(r)),
            wide(state.reward),
            grads_,
            wide(params),
            wide(state.init_particles),
        )
        cumulative = jax.tree.map(
            lambda c, g: c - g, wide(state.cumulative_gradients), grads_
        )

        def step(p, p0, c, lim, g_sum, r):
            bet = c / (lim * jnp.maximum(g_sum + lim, alpha.astype(lim.dtype) * lim))
            return -p + (p0 + bet * (lim + r))

        updates = jax.tree.map(
            step,
            wide(params),
            wide(state.init_particles),
            cumulative,
            scale,
            subgradients,
            reward,
        )
        new_state = COCOBState(
            safe_increment(state.count),
            state.init_particles,
            cast_like(cumulative, state.cumulative_gradients),
            cast_like(scale, state.scale),
            cast_like(subgradients, state.subgradients),
            cast_like(reward, state.reward),
        )
        return updates, new_state


def scale_by_cocob(
    alpha: ScalarOrSchedule = 100.0,
    eps: ScalarOrSchedule = 1e-8,
    *,
    accumulator_dtype: DTypeLike | None = None,
) -> ScaleByCocob:
    """Rescale updates by COCOB-Backprop's coin betting (the update is the move).

    ``accumulator_dtype``: the dtype the four per-element accumulators are
    stored in (default: each parameter's); a non-floating dtype is an error.
    """
    return ScaleByCocob(
        alpha, eps, canonical_dtype(accumulator_dtype, "accumulator_dtype")
    )


class DAdaptAdamWState(eqx.Module):
    exp_avg: Updates
    exp_avg_sq: Updates
    grad_sum: Updates  # the EMA of dlr-weighted gradients
    estim_lr: Array  # d: the distance-to-solution estimate (a scalar)
    numerator_weighted: Array  # the EMA of d-weighted <g, s> (a scalar)
    count: Array


class DAdaptAdamW(AbstractTransform):
    """D-Adaptation for AdamW: Adam whose step size ``d`` estimates ``||x0 - x*||``.

    ``dlr = d lr sqrt(1 - b2^t) / (1 - b1^t)``; ``m = b1 m + (1 - b1) dlr g``,
    ``v = b2 v + (1 - b2) g^2``, ``s = sqrt(b2) s + (1 - sqrt(b2)) dlr g``;
    ``d = max(d, r / ((1 - sqrt(b2)) ||s||_1))`` with ``r`` the EMA of
    ``dlr <g, s / (sqrt(v) + eps)>``; update ``-wd dlr x - m / (sqrt(v) + eps)``.
    The scalars, ``m`` and ``s`` are kept in the parameters' highest dtype
    (float32 for a bfloat16 leaf in a mixed tree): the dtypes optax's state
    takes from its second step on.

    Storage dtypes: ``mu_dtype`` for ``m``, ``nu_dtype`` for ``v``,
    ``accumulator_dtype`` for ``s``; each is updated and used in float32 and
    rounded once when stored.

    Defazio & Mishchenko, "Learning-Rate-Free Learning by D-Adaptation",
    ICML 2023.
    """

    learning_rate: Hyperparameter = hyperparameter("learning_rate", NONNEGATIVE)
    b1: Hyperparameter = hyperparameter("betas[0]", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("betas[1]", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    estim_lr0: Hyperparameter = hyperparameter("estim_lr0", POSITIVE)
    weight_decay: Hyperparameter = hyperparameter("weight_decay", NONNEGATIVE)
    mu_dtype: jnp.dtype | None = storage_dtype_field("mu_dtype")
    nu_dtype: jnp.dtype | None = storage_dtype_field("nu_dtype")
    accumulator_dtype: jnp.dtype | None = storage_dtype_field("accumulator_dtype")

    def init(self, params: Params) -> DAdaptAdamWState:
        low, high = scalar_dtypes(params)
        d0 = resolve(self.estim_lr0, zero_count(), name="estim_lr0")
        return DAdaptAdamWState(
            _stored_zeros(params, self.mu_dtype),
            zeros_like(params, self.nu_dtype),
            _stored_zeros(params, self.accumulator_dtype),
            d0.astype(low).astype(high),
            jnp.zeros([], high),
            zero_count(),
        )

    def update(
        self, grads: Updates, state: DAdaptAdamWState, params: Params | None = None
    ) -> tuple[Updates, DAdaptAdamWState]:
        if params is None:
            raise ValueError(NEEDS_PARAMS.format(name="dadapt_adamw"))
        count = state.count
        dtype = state.estim_lr.dtype
        get = lambda field, name: resolve(field, count, name=name).astype(dtype)
        lr = get(self.learning_rate, "learning_rate")
        b1, b2 = get(self.b1, "betas[0]"), get(self.b2, "betas[1]")
        eps = resolve(self.eps, count, name="eps")
        wd = get(self.weight_decay, "weight_decay")
        sb2 = jnp.sqrt(b2)
        # 1 - sqrt(b2) without float32's cancellation (optax folds it in float64)
        one_minus_sb2 = (1 - b2) / (1 + sb2)
        t = safe_increment(count).astype(dtype)
        bc = (1 - b2**t) ** 0.5 / (1 - b1**t)
        low = _first_step_rounding(params, count)
        dlr = low(low(state.estim_lr * lr) * bc)

        old_m = widened(state.exp_avg, self.mu_dtype)
        old_v = widened(state.exp_avg_sq, self.nu_dtype)
        old_s = widened(state.grad_sum, self.accumulator_dtype)

        def weighted(s, v):
            return _divide(s, jnp.sqrt(v) + eps.astype(v.dtype))

        numerator = vdot(grads, jax.tree.map(weighted, old_s, old_v))
        m_rate, s_rate = low((1 - b1) * dlr), low(one_minus_sb2 * dlr)
        leaf = _first_step_leaf_rounding(count)
        exp_avg = jax.tree.map(
            lambda m, g: leaf(add(b1.astype(m.dtype) * m, _scaled(m_rate, g)), g.dtype),
            old_m,
            grads,
        )
        exp_avg_sq = jax.tree.map(
            lambda v, g: b2.astype(v.dtype) * v + (1 - b2).astype(g.dtype) * g * g,
            old_v,
            widened(grads, self.nu_dtype),
        )
        grad_sum = jax.tree.map(
            lambda s, g: leaf(
                add(sb2.astype(s.dtype) * s, _scaled(s_rate, g)), g.dtype
            ),
            old_s,
            grads,
        )
        numerator_weighted = sb2 * state.numerator_weighted + s_rate * numerator.astype(
            dtype
        )
        d = numerator_weighted / (one_minus_sb2 * _l1(grad_sum).astype(dtype))
        estim_lr = jnp.maximum(state.estim_lr, d)
        decay = -low(wd * dlr)

        def step(m, v, p):
            direction = _divide(m, jnp.sqrt(v) + eps.astype(v.dtype))
            return add(_scaled(decay, p), -direction)

        updates = jax.tree.map(step, exp_avg, exp_avg_sq, params)
        new_state = DAdaptAdamWState(
            cast_like(exp_avg, state.exp_avg),
            cast_like(exp_avg_sq, state.exp_avg_sq),
            cast_like(grad_sum, state.grad_sum),
            estim_lr,
            numerator_weighted,
            safe_increment(count),
        )
        return updates, new_state


def _optional_beta3(value: ScalarOrSchedule | None) -> Hyperparameter | None:
    if value is None:
        return None  # sqrt(b2), at each step
    return as_hyperparameter(value, name="beta3", domain=UNIT_INTERVAL)


class ProdigyState(eqx.Module):
    exp_avg: Updates
    exp_avg_sq: Updates
    grad_sum: Updates  # the EMA of d-weighted gradients
    params0: Updates  # the starting parameters
    estim_lr: Array  # d: the distance-to-solution estimate (a scalar)
    numerator_weighted: Array  # the EMA of d-weighted <g, x0 - x> (a scalar)
    count: Array


class Prodigy(AbstractTransform):
    """Prodigy: D-Adaptation's Adam with ``d`` from ``<g, x0 - x>`` directly.

    ``dlr = d lr sqrt(1 - b2^t) / (1 - b1^t)``; the moments are of ``d g``;
    ``s = b3 s + dlr d g / d0`` and ``r = b3 r + (d / d0) dlr <g, x0 - x>``;
    ``d = max(d, coef r / ||s||_1)``; update
    ``-wd dlr x - dlr m / (sqrt(v) + d eps)``. ``b3`` defaults to ``sqrt(b2)``;
    ``safeguard_warmup`` uses ``d`` instead of ``dlr`` in ``s``. The scalars,
    ``m``, ``v`` and ``s`` are kept in the parameters' highest dtype (float32 for
    a bfloat16 leaf in a mixed tree): the dtypes optax's state takes from its
    second step on.

    Storage dtypes: ``mu_dtype`` for ``m``, ``nu_dtype`` for ``v``,
    ``accumulator_dtype`` for ``s``; each is updated and used in float32 and
    rounded once when stored. ``x0`` stays in the parameters' dtype.

    Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free
    Learner", ICML 2024.
    """

    learning_rate: Hyperparameter = hyperparameter("learning_rate", NONNEGATIVE)
    b1: Hyperparameter = hyperparameter("betas[0]", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("betas[1]", UNIT_INTERVAL)
    b3: Hyperparameter | None = eqx.field(
        converter=_optional_beta3,
        metadata={"hyperparameter": {"domain": UNIT_INTERVAL}},
    )
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    estim_lr0: Hyperparameter = hyperparameter("estim_lr0", POSITIVE)
    estim_lr_coef: Hyperparameter = hyperparameter("estim_lr_coef", NONNEGATIVE)
    weight_decay: Hyperparameter = hyperparameter("weight_decay", NONNEGATIVE)
    safeguard_warmup: bool = eqx.field(static=True)
    mu_dtype: jnp.dtype | None = storage_dtype_field("mu_dtype")
    nu_dtype: jnp.dtype | None = storage_dtype_field("nu_dtype")
    accumulator_dtype: jnp.dtype | None = storage_dtype_field("accumulator_dtype")

    def init(self, params: Params) -> ProdigyState:
        low, high = scalar_dtypes(params)
        d0 = resolve(self.estim_lr0, zero_count(), name="estim_lr0")
        return ProdigyState(
            _stored_zeros(params, self.mu_dtype),
            _stored_zeros(params, self.nu_dtype),
            _stored_zeros(params, self.accumulator_dtype),
            copied(params),
            d0.astype(low).astype(high),
            jnp.zeros([], high),
            zero_count(),
        )

    def update(
        self, grads: Updates, state: ProdigyState, params: Params | None = None
    ) -> tuple[Updates, ProdigyState]:
        if params is None:
            raise ValueError(NEEDS_PARAMS.format(name="prodigy"))
        count = state.count
        dtype = state.estim_lr.dtype
        get = lambda field, name: resolve(field, count, name=name).astype(dtype)
        lr = get(self.learning_rate, "learning_rate")
        b1, b2 = get(self.b1, "betas[0]"), get(self.b2, "betas[1]")
        b3 = jnp.sqrt(b2) if self.b3 is None else get(self.b3, "beta3")
        eps, d0 = get(self.eps, "eps"), get(self.estim_lr0, "estim_lr0")
        coef = get(self.estim_lr_coef, "estim_lr_coef")
        wd = get(self.weight_decay, "weight_decay")
        d = state.estim_lr
        t = safe_increment(count).astype(dtype)
        low = _first_step_rounding(params, count)
        dlr = low(low(d * lr) * ((1 - b2**t) ** 0.5 / (1 - b1**t)))
        leaf = _first_step_leaf_rounding(count)
        dg = jax.tree.map(lambda g: leaf(_scaled(d, g), g.dtype), grads)
        diff = jax.tree.map(lambda p0, p: add(p0, -p), state.params0, params)
        numerator = vdot(grads, diff).astype(dtype)
        exp_avg = jax.tree.map(
            lambda m, x, g: leaf(
                add(b1.astype(m.dtype) * m, (1 - b1).astype(x.dtype) * x), g.dtype
            ),
            widened(state.exp_avg, self.mu_dtype),
            dg,
            grads,
        )
        exp_avg_sq = jax.tree.map(
            lambda v, x, g: leaf(
                add(b2.astype(v.dtype) * v, (1 - b2).astype(x.dtype) * x * x), g.dtype
            ),
            widened(state.exp_avg_sq, self.nu_dtype),
            dg,
            grads,
        )
        rate = d if self.safeguard_warmup else dlr

        def sum_step(s, x):
            step = _scaled(rate, x)
            return add(b3.astype(s.dtype) * s, step / d0.astype(step.dtype))

        grad_sum = jax.tree.map(
            lambda s, x, g: leaf(sum_step(s, x), g.dtype),
            widened(state.grad_sum, self.accumulator_dtype),
            dg,
            grads,
        )
        numerator_weighted = (
            b3 * state.numerator_weighted + low(low(d / d0) * dlr) * numerator
        )
        estimate = coef * numerator_weighted / _l1(grad_sum).astype(dtype)
        estim_lr = jnp.maximum(d, estimate)
        decay = -low(wd * dlr)

        def step(m, v, p):
            numerator, denom = promote(_scaled(dlr, m), add(jnp.sqrt(v), low(d * eps)))
            return add(_scaled(decay, p), -(numerator / denom))

        updates = jax.tree.map(step, exp_avg, exp_avg_sq, params)
        new_state = ProdigyState(
            cast_like(exp_avg, state.exp_avg),
            cast_like(exp_avg_sq, state.exp_avg_sq),
            cast_like(grad_sum, state.grad_sum),
            state.params0,
            estim_lr,
            numerator_weighted,
            safe_increment(count),
        )
        return updates, new_state
