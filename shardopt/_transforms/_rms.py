"""Dividing by accumulated squared gradients: RMSProp, its centred form, Adagrad."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._hyperparams import (
    NONNEGATIVE,
    UNIT_INTERVAL,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import (
    add,
    bias_correction,
    ema,
    full_like,
    promote,
    zeros_like,
)


class ScaleByRmsState(eqx.Module):
    count: Array
    nu: Updates


class ScaleByRms(AbstractTransform):
    """Divide by the root of a moving average of squared gradients (RMSProp).

    Tieleman & Hinton, "Lecture 6.5 - RMSProp", COURSERA, 2012.
    """

    decay: Hyperparameter = hyperparameter("decay", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter(
        "eps", NONNEGATIVE, guards_division_with=("initial_scale",)
    )
    initial_scale: Hyperparameter = hyperparameter("initial_scale", NONNEGATIVE)
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

    decay: Hyperparameter = hyperparameter("decay", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter(
        "eps", NONNEGATIVE, guards_division_with=("initial_scale",)
    )
    initial_scale: Hyperparameter = hyperparameter("initial_scale", NONNEGATIVE)
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
        "initial_accumulator_value", NONNEGATIVE
    )
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)

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
