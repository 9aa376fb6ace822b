"""Transforms that keep moving averages of the gradients: momentum, Adam, RMS, Lion."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._hyperparams import Hyperparameter, ScalarOrSchedule, hyperparameter, resolve
from .._tree_math import (
    add,
    bias_correction,
    canonical_dtype,
    cast,
    cast_like,
    ema,
    full_like,
    promote,
    zeros_like,
)


class TraceState(eqx.Module):
    count: Array
    trace: Updates


class Trace(AbstractTransform):
    """Heavy-ball momentum: ``trace = g + decay * trace``.

    Polyak, "Some methods of speeding up the convergence of iteration methods",
    1964; Nesterov's variant after Sutskever et al., ICML 2013.
    """

    decay: Hyperparameter = hyperparameter("decay")
    nesterov: bool = eqx.field(static=True)
    accumulator_dtype: jnp.dtype | None = eqx.field(static=True)

    def init(self, params: Params) -> TraceState:
        return TraceState(zero_count(), zeros_like(params, self.accumulator_dtype))

    def update(
        self, grads: Updates, state: TraceState, params: Params | None = None
    ) -> tuple[Updates, TraceState]:
        del params
        decay = resolve(self.decay, state.count, name="decay")
        step = lambda g, t: add(g, decay.astype(t.dtype) * t)
        trace = jax.tree.map(step, grads, state.trace)
        updates = jax.tree.map(step, grads, trace) if self.nesterov else trace
        trace = cast(trace, self.accumulator_dtype)
        return updates, TraceState(safe_increment(state.count), trace)


class ScaleByAdamState(eqx.Module):
    count: Array
    mu: Updates
    nu: Updates


class ScaleByAdam(AbstractTransform):
    """Adam's rescaling: bias-corrected first moment over the root of the second.

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
    ``nesterov=True`` is Nadam (Dozat, "Incorporating Nesterov Momentum into
    Adam", 2016).
    """

    b1: Hyperparameter = hyperparameter("b1")
    b2: Hyperparameter = hyperparameter("b2")
    eps: Hyperparameter = hyperparameter("eps", nonnegative=True)
    eps_root: Hyperparameter = hyperparameter("eps_root", nonnegative=True)
    mu_dtype: jnp.dtype | None = eqx.field(static=True)
    nesterov: bool = eqx.field(static=True)

    def init(self, params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(
            zero_count(), zeros_like(params, self.mu_dtype), zeros_like(params)
        )

    def update(
        self, grads: Updates, state: ScaleByAdamState, params: Params | None = None
    ) -> tuple[Updates, ScaleByAdamState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        eps = resolve(self.eps, state.count, name="eps")
        eps_root = resolve(self.eps_root, state.count, name="eps_root")
        mu = jax.tree.map(lambda g, m: ema(g, m, b1, 1), grads, state.mu)
        nu = jax.tree.map(lambda g, v: ema(g, v, b2, 2), grads, state.nu)
        count = safe_increment(state.count)
        mu_hat = jax.tree.map(lambda m: bias_correction(m, b1, count), mu)
        if self.nesterov:
            mu_next = jax.tree.map(
                lambda m: bias_correction(m, b1, safe_increment(count)), mu
            )
            g_hat = jax.tree.map(lambda g: bias_correction(g, b1, count), grads)
            mu_hat = jax.tree.map(
                lambda m, g: add(b1.astype(m.dtype) * m, (1 - b1).astype(g.dtype) * g),
                mu_next,
                g_hat,
            )

        def direction(m, v):
            v_hat = bias_correction(v, b2, count)
            denom = jnp.sqrt(v_hat + eps_root.astype(v.dtype)) + eps.astype(v.dtype)
            m, denom = promote(m, denom)
            return m / denom

        updates = jax.tree.map(direction, mu_hat, nu)
        mu = cast(mu, self.mu_dtype)
        nu = cast_like(nu, state.nu)
        return updates, ScaleByAdamState(count, mu, nu)


class ScaleByRmsState(eqx.Module):
    count: Array
    nu: Updates


class ScaleByRms(AbstractTransform):
    """Divide by the root of a moving average of squared gradients (RMSProp).

    Tieleman & Hinton, "Lecture 6.5 - RMSProp", COURSERA, 2012.
    """

    decay: Hyperparameter = hyperparameter("decay")
    eps: Hyperparameter = hyperparameter("eps", nonnegative=True)
    initial_scale: Hyperparameter = hyperparameter("initial_scale", nonnegative=True)
    eps_in_sqrt: bool = eqx.field(static=True)
    bias_correction: bool = eqx.field(static=True)

    def init(self, params: Params) -> ScaleByRmsState:
        initial = resolve(self.initial_scale, zero_count(), name="initial_scale")
        return ScaleByRmsState(zero_count(), full_like(params, initial))

    def update(
        self, grads: Updates, state: ScaleByRmsState, params: Params | None = None
    ) -> tuple[Updates, ScaleByRmsState]:
        del params
        decay = resolve(self.decay, state.count, name="decay")
        eps = resolve(self.eps, state.count, name="eps")
        nu = jax.tree.map(lambda g, v: ema(g, v, decay, 2), grads, state.nu)
        count = safe_increment(state.count)

        def direction(g, v):
            if self.bias_correction:
                v = bias_correction(v, decay, count)
            e = eps.astype(v.dtype)
            scaling = (
                jax.lax.rsqrt(v + e) if self.eps_in_sqrt else 1 / (jnp.sqrt(v) + e)
            )
            scaling, g = promote(scaling, g)
            return scaling * g

        return jax.tree.map(direction, grads, nu), ScaleByRmsState(count, nu)


class ScaleByStddevState(eqx.Module):
    count: Array
    mu: Updates
    nu: Updates


class ScaleByStddev(AbstractTransform):
    """Divide by a moving estimate of the gradients' standard deviation.

    Graves, "Generating Sequences With Recurrent Neural Networks", 2013.
    """

    decay: Hyperparameter = hyperparameter("decay")
    eps: Hyperparameter = hyperparameter("eps", nonnegative=True)
    initial_scale: Hyperparameter = hyperparameter("initial_scale", nonnegative=True)
    eps_in_sqrt: bool = eqx.field(static=True)
    bias_correction: bool = eqx.field(static=True)

    def init(self, params: Params) -> ScaleByStddevState:
        initial = resolve(self.initial_scale, zero_count(), name="initial_scale")
        return ScaleByStddevState(
            zero_count(), zeros_like(params), full_like(params, initial)
        )

    def update(
        self, grads: Updates, state: ScaleByStddevState, params: Params | None = None
    ) -> tuple[Updates, ScaleByStddevState]:
        del params
        decay = resolve(self.decay, state.count, name="decay")
        eps = resolve(self.eps, state.count, name="eps")
        mu = jax.tree.map(lambda g, m: ema(g, m, decay, 1), grads, state.mu)
        nu = jax.tree.map(lambda g, v: ema(g, v, decay, 2), grads, state.nu)
        count = safe_increment(state.count)

        def direction(g, m, v):
            if self.bias_correction:
                m = bias_correction(m, decay, count)
                v = bias_correction(v, decay, count)
            variance = add(v, -(m * m))
            e = eps.astype(variance.dtype)
            if self.eps_in_sqrt:
                scaling = jax.lax.rsqrt(variance + e)
            else:
                scaling = 1 / (jnp.sqrt(variance) + e)
            scaling, g = promote(scaling, g)
            return scaling * g

        updates = jax.tree.map(direction, grads, mu, nu)
        return updates, ScaleByStddevState(count, mu, nu)


class ScaleByRssState(eqx.Module):
    count: Array
    sum_of_squares: Updates


class ScaleByRss(AbstractTransform):
    """Divide by the root of the sum of all squared gradients so far (Adagrad).

    Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011.
    """

    initial_accumulator_value: Hyperparameter = hyperparameter(
        "initial_accumulator_value", nonnegative=True
    )
    eps: Hyperparameter = hyperparameter("eps", nonnegative=True)

    def init(self, params: Params) -> ScaleByRssState:
        initial = resolve(
            self.initial_accumulator_value,
            zero_count(),
            name="initial_accumulator_value",
        )
        return ScaleByRssState(zero_count(), full_like(params, initial))

    def update(
        self, grads: Updates, state: ScaleByRssState, params: Params | None = None
    ) -> tuple[Updates, ScaleByRssState]:
        del params
        eps = resolve(self.eps, state.count, name="eps")
        sums = jax.tree.map(lambda g, t: add(g * g, t), grads, state.sum_of_squares)

        def direction(g, t):
            inverse = jnp.where(
                t > 0, jax.lax.rsqrt(t + eps.astype(t.dtype)), jnp.zeros((), t.dtype)
            )
            inverse, g = promote(inverse, g)
            return inverse * g

        updates = jax.tree.map(direction, grads, sums)
        return updates, ScaleByRssState(safe_increment(state.count), sums)


class ScaleByLionState(eqx.Module):
    count: Array
    mu: Updates


class ScaleByLion(AbstractTransform):
    """Lion: the sign of an interpolation between momentum and gradient.

    Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023.
    """

    b1: Hyperparameter = hyperparameter("b1")
    b2: Hyperparameter = hyperparameter("b2")
    mu_dtype: jnp.dtype | None = eqx.field(static=True)

    def init(self, params: Params) -> ScaleByLionState:
        return ScaleByLionState(zero_count(), zeros_like(params, self.mu_dtype))

    def update(
        self, grads: Updates, state: ScaleByLionState, params: Params | None = None
    ) -> tuple[Updates, ScaleByLionState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        updates = jax.tree.map(
            lambda g, m: jnp.sign(
                add((1 - b1).astype(g.dtype) * g, b1.astype(m.dtype) * m)
            ),
            grads,
            state.mu,
        )
        mu = jax.tree.map(lambda g, m: ema(g, m, b2, 1), grads, state.mu)
        mu = cast(mu, self.mu_dtype)
        return updates, ScaleByLionState(safe_increment(state.count), mu)


def trace(
    decay: ScalarOrSchedule,
    nesterov: bool = False,
    accumulator_dtype: DTypeLike | None = None,
) -> Trace:
    """Momentum: ``trace = g + decay * trace``, emitted as is or Nesterov-style."""
    return Trace(decay, nesterov, canonical_dtype(accumulator_dtype))


def scale_by_adam(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = False,
) -> ScaleByAdam:
    """Rescale updates by Adam's bias-corrected moments."""
    return ScaleByAdam(b1, b2, eps, eps_root, canonical_dtype(mu_dtype), nesterov)


def scale_by_rms(
    decay: ScalarOrSchedule = 0.9,
    eps: ScalarOrSchedule = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> ScaleByRms:
    """Rescale updates by the root of a moving average of squared gradients."""
    return ScaleByRms(decay, eps, initial_scale, eps_in_sqrt, bias_correction)


def scale_by_stddev(
    decay: ScalarOrSchedule = 0.9,
    eps: ScalarOrSchedule = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> ScaleByStddev:
    """Rescale updates by a moving estimate of the gradients' standard deviation."""
    return ScaleByStddev(decay, eps, initial_scale, eps_in_sqrt, bias_correction)


def scale_by_rss(
    initial_accumulator_value: float = 0.1, eps: ScalarOrSchedule = 1e-7
) -> ScaleByRss:
    """Rescale updates by the root of the running sum of squared gradients."""
    return ScaleByRss(initial_accumulator_value, eps)


def scale_by_lion(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.99,
    mu_dtype: DTypeLike | None = None,
) -> ScaleByLion:
    """Rescale updates to the sign of Lion's momentum interpolation."""
    return ScaleByLion(b1, b2, canonical_dtype(mu_dtype))
