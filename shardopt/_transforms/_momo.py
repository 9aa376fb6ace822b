"""MoMo: model-based momentum, a Polyak-like step size from the loss and a lower bound.

Both transforms need the loss at every step: ``update(..., value=loss)``, or
``Optimizer.step(params, grads, value=loss)``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._hyperparams import (
    NONNEGATIVE,
    UNIT_INTERVAL,
    Hyperparameter,
    hyperparameter,
    resolve,
)
from .._tree_math import (
    add,
    cast_like,
    promote,
    squared_norm,
    storage_dtype_field,
    vdot,
    widened,
    zeros_like,
)
from ._dog import scalar_dtypes

# optax's threshold below which the momentum's norm counts as zero: float64's eps
_TINY = float(np.finfo(float).eps)


def _loss(value: ArrayLike | None, name: str, dtype: jnp.dtype) -> Array:
    if value is None:
        raise ValueError(
            f"{name} needs the loss: call update(grads, state, params, "
            "value=loss), or Optimizer.step(params, grads, value=loss)"
        )
    value = jnp.asarray(value)
    if value.shape != ():
        raise ValueError(f"value must be a scalar loss, got shape {value.shape}")
    return value.astype(dtype)


def _no_params(name: str) -> ValueError:
    return ValueError(f"{name} needs the parameters: call update(grads, state, params)")


def _ema(decay: Array, average: Array, value: Array) -> Array:
    """``decay * average + (1 - decay) * value`` for scalars of one dtype."""
    return decay.astype(average.dtype) * average + (1 - decay).astype(
        average.dtype
    ) * value.astype(average.dtype)


def _mul(a: Array, b: Array) -> Array:
    return jnp.multiply(*promote(a, b))


def _div(a: Array, b: Array) -> Array:
    return jnp.divide(*promote(a, b))


def _step(decay: Array, p: Array, tau: Array, direction: Array) -> Array:
    """``decay * p - tau * direction``, each product in its promoted dtype."""
    return add(
        jnp.multiply(*promote(decay, p)), -jnp.multiply(*promote(tau, direction))
    )


class MomoState(eqx.Module):
    exp_avg: Updates  # the momentum
    barf: Array  # the EMA of the loss (a scalar)
    gamma: Array  # the EMA of <g, x> (a scalar)
    lb: Array  # the lower bound on the loss (a scalar)
    count: Array


class Momo(AbstractTransform):
    """MoMo (SGD): the momentum step, capped at the model's Polyak step.

    With ``d = m`` the momentum and ``k = 1 + lr wd``: ``t = max(k (fbar - lb -
    gamma) + <d, x>, 0) / ||d||^2`` (0 when ``||d||^2`` is below float64's
    epsilon), ``tau = min(lr, t)``, update ``-(lr wd / k) x - tau d``; ``fbar``,
    ``gamma`` and ``d`` are EMAs of the loss, ``<g, x>`` and ``g`` (started at
    the first values). ``adapt_lower_bound`` raises ``lb`` from the model.

    The scalars (the averages of the loss and of ``<g, x>``, the lower bound)
    are kept in the parameters' highest dtype. optax keeps them in the lowest:
    on a tree that mixes bfloat16 and float32 it averages the loss in bfloat16
    (8 bits: a loss of 164 moves in steps of 1), and whether XLA rounds its
    intermediates depends on fusion. On a tree of one dtype the numbers are
    optax's.

    ``mu_dtype`` stores the momentum: updated and used in float32, rounded
    once when stored.

    Schaipp, Ohana, Eickenberg, Defazio & Gower, "MoMo: Momentum Models for
    Adaptive Learning Rates", ICML 2024.
    """

    learning_rate: Hyperparameter = hyperparameter("learning_rate", NONNEGATIVE)
    beta: Hyperparameter = hyperparameter("beta", UNIT_INTERVAL)
    lower_bound: Hyperparameter = hyperparameter("lower_bound")
    weight_decay: Hyperparameter = hyperparameter("weight_decay", NONNEGATIVE)
    adapt_lower_bound: bool = eqx.field(static=True)
    mu_dtype: jnp.dtype | None = storage_dtype_field("mu_dtype")
    takes_extra_args = True

    def init(self, params: Params) -> MomoState:
        _, high = scalar_dtypes(params)
        lb = resolve(self.lower_bound, zero_count(), name="lower_bound").astype(high)
        return MomoState(
            zeros_like(params, self.mu_dtype),
            jnp.zeros([], high),
            jnp.zeros([], high),
            lb,
            zero_count(),
        )

    def update(
        self,
        grads: Updates,
        state: MomoState,
        params: Params | None = None,
        *,
        value: ArrayLike | None = None,
        **extra_args: object,
    ) -> tuple[Updates, MomoState]:
        del extra_args
        if params is None:
            raise _no_params("momo")
        value = _loss(value, "momo", state.barf.dtype)
        count = state.count
        high = state.gamma.dtype
        beta = resolve(self.beta, count, name="beta")
        bt = jnp.where(count == 0, jnp.zeros_like(beta), beta)
        barf = _ema(bt, state.barf, value)
        exp_avg = jax.tree.map(
            lambda m, g: bt.astype(m.dtype) * m + (1 - bt).astype(g.dtype) * g,
            widened(state.exp_avg, self.mu_dtype),
            widened(grads, self.mu_dtype),
        )
        gx = vdot(grads, params)
        gamma = add(bt.astype(high) * state.gamma, (1 - bt).astype(gx.dtype) * gx)
        norm = squared_norm(exp_avg)
        iprod = vdot(exp_avg, params)
        lr = resolve(self.learning_rate, count, name="learning_rate").astype(high)
        wd = resolve(self.weight_decay, count, name="weight_decay").astype(high)
        floor = resolve(self.lower_bound, count, name="lower_bound").astype(high)
        k = 1 + lr * wd
        lb = state.lb
        if self.adapt_lower_bound:
            cap = add(k * add(barf, -gamma), iprod)
            lb = jnp.where(cap < k * lb, jnp.maximum(cap / (2 * k), floor), lb)
        gap = barf - lb - gamma
        t1 = jnp.maximum(add(k * gap, iprod), 0.0) / norm
        t1 = jnp.where(norm <= _TINY, jnp.zeros_like(t1), t1)
        tau = jnp.minimum(lr, t1)
        decay = -(lr * wd) / k
        updates = jax.tree.map(lambda m, p: _step(decay, p, tau, m), exp_avg, params)
        if self.adapt_lower_bound:
            model = add(add(barf, iprod), -gamma)
            lb = jnp.maximum(add(model, -(0.5 * tau * norm)), floor)
            lb = lb.astype(state.lb.dtype)
        exp_avg = cast_like(exp_avg, state.exp_avg)
        new_state = MomoState(exp_avg, barf, gamma, lb, safe_increment(count))
        return updates, new_state


class MomoAdamState(eqx.Module):
    exp_avg: Updates
    exp_avg_sq: Updates
    barf: Array  # the EMA of the loss (a scalar)
    gamma: Array  # the EMA of <g, x> (a scalar)
    lb: Array  # the lower bound on the loss (a scalar)
    count: Array


class MomoAdam(AbstractTransform):
    """MoMo-Adam: Adam's preconditioned momentum, capped at the model's step.

    ``D = eps + sqrt(v / (1 - b2^t))``, ``n = <m, m / D>``, ``c1 = 1 - b1^t``;
    ``t = max(k (fbar - c1 lb - gamma) + <m, x>, 0) / n``, ``tau = min(lr / c1,
    t)``, update ``-(lr wd / k) x - tau m / D`` with ``k = 1 + lr wd``.
    The scalars are kept as :func:`momo`'s. ``mu_dtype`` / ``nu_dtype``
    store ``m`` and ``v``: updated and used in float32, rounded once.

    Schaipp, Ohana, Eickenberg, Defazio & Gower, "MoMo: Momentum Models for
    Adaptive Learning Rates", ICML 2024.
    """

    learning_rate: Hyperparameter = hyperparameter("learning_rate", NONNEGATIVE)
    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    lower_bound: Hyperparameter = hyperparameter("lower_bound")
    weight_decay: Hyperparameter = hyperparameter("weight_decay", NONNEGATIVE)
    adapt_lower_bound: bool = eqx.field(static=True)
    mu_dtype: jnp.dtype | None = storage_dtype_field("mu_dtype")
    nu_dtype: jnp.dtype | None = storage_dtype_field("nu_dtype")
    takes_extra_args = True

    def init(self, params: Params) -> MomoAdamState:
        _, high = scalar_dtypes(params)
        lb = resolve(self.lower_bound, zero_count(), name="lower_bound").astype(high)
        return MomoAdamState(
            zeros_like(params, self.mu_dtype),
            zeros_like(params, self.nu_dtype),
            jnp.zeros([], high),
            jnp.zeros([], high),
            lb,
            zero_count(),
        )

    def update(
        self,
        grads: Updates,
        state: MomoAdamState,
        params: Params | None = None,
        *,
        value: ArrayLike | None = None,
        **extra_args: object,
    ) -> tuple[Updates, MomoAdamState]:
        del extra_args
        if params is None:
            raise _no_params("momo_adam")
        high = state.gamma.dtype
        value = _loss(value, "momo_adam", high)
        count = state.count
        t = safe_increment(count)
        b1 = resolve(self.b1, count, name="b1")
        b2 = resolve(self.b2, count, name="b2")
        eps = resolve(self.eps, count, name="eps")
        barf = _ema(b1, state.barf, value)
        exp_avg = jax.tree.map(
            lambda m, g: b1.astype(m.dtype) * m + (1 - b1).astype(g.dtype) * g,
            widened(state.exp_avg, self.mu_dtype),
            widened(grads, self.mu_dtype),
        )
        exp_avg_sq = jax.tree.map(
            lambda v, g: b2.astype(v.dtype) * v + (1 - b2).astype(g.dtype) * g * g,
            widened(state.exp_avg_sq, self.nu_dtype),
            widened(grads, self.nu_dtype),
        )
        bc2 = (1 - b2 ** t.astype(b2.dtype)).astype(high)
        bc1 = (1 - b1 ** t.astype(b1.dtype)).astype(high)

        def precondition(v):
            v, c = promote(v, bc2)
            return eps.astype(v.dtype) + jnp.sqrt(v / c)

        precond = jax.tree.map(precondition, exp_avg_sq)
        weighted = jax.tree.map(_div, exp_avg, precond)
        norm = vdot(exp_avg, weighted)
        gx = vdot(grads, params)
        gamma = add(b1.astype(high) * state.gamma, (1 - b1).astype(gx.dtype) * gx)
        iprod = vdot(exp_avg, params)
        lr = resolve(self.learning_rate, count, name="learning_rate").astype(high)
        wd = resolve(self.weight_decay, count, name="weight_decay").astype(high)
        floor = resolve(self.lower_bound, count, name="lower_bound").astype(high)
        k = 1 + lr * wd
        lb = state.lb
        if self.adapt_lower_bound:
            cap = add(k * add(barf, -gamma), iprod)
            lb = jnp.where(
                cap < _mul(_mul(k, bc1), lb),
                jnp.maximum(_div(cap, _mul(2 * bc1, k)), floor),
                lb,
            )
        gap = barf - bc1 * lb - gamma
        t1 = jnp.maximum(add(k * gap, iprod), 0.0) / norm
        t1 = jnp.where(norm <= _TINY, jnp.zeros_like(t1), t1)
        tau = jnp.minimum(lr / bc1, t1)
        decay = -(lr * wd) / k
        updates = jax.tree.map(lambda w, p: _step(decay, p, tau, w), weighted, params)
        if self.adapt_lower_bound:
            model = add(add(barf, iprod), -gamma)
            lb = jnp.maximum(_div(add(model, -(0.5 * tau * norm)), bc1), floor)
            lb = lb.astype(state.lb.dtype)
        exp_avg = cast_like(exp_avg, state.exp_avg)
        exp_avg_sq = cast_like(exp_avg_sq, state.exp_avg_sq)
        new_state = MomoAdamState(exp_avg, exp_avg_sq, barf, gamma, lb, t)
        return updates, new_state
