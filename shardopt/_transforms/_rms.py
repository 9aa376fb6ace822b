"""Dividing by accumulated squared gradients: RMSProp, its centred form, Adagrad."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
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
    canonical_dtype,
    cast_like,
    ema,
    full_like,
    promote,
    widened,
    zeros_like,
)


class ScaleByRmsState(eqx.Module):
    count: Array
    nu: Updates


class ScaleByRms(AbstractTransform):
    """Divide by the root of a moving average of squared gradients (RMSProp).

    Tieleman & Hinton, "Lecture 6.5 - RMSProp", COURSERA, 2012.
    """

    elementwise = True

    decay: Hyperparameter = hyperparameter("decay", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter(
        "eps", NONNEGATIVE, guards_division_with=("initial_scale",)
    )
    initial_scale: Hyperparameter = hyperparameter("initial_scale", NONNEGATIVE)
    eps_in_sqrt: bool = eqx.field(static=True)
    bias_correction: bool = eqx.field(static=True)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByRmsState:
        initial = resolve(self.initial_scale, zero_count(), name="initial_scale")
        return ScaleByRmsState(zero_count(), full_like(params, initial, self.nu_dtype))

    def update(
        self, grads: Updates, state: ScaleByRmsState, params: Params | None = None
    ) -> tuple[Updates, ScaleByRmsState]:
        del params
        decay = resolve(self.decay, state.count, name="decay")
        eps = resolve(self.eps, state.count, name="eps")
        nu = jax.tree.map(
            lambda g, v: ema(g, v, decay, 2),
            widened(grads, self.nu_dtype),
            widened(state.nu, self.nu_dtype),
        )
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

        updates = jax.tree.map(direction, grads, nu)
        return updates, ScaleByRmsState(count, cast_like(nu, state.nu))


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
    mu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByStddevState:
        initial = resolve(self.initial_scale, zero_count(), name="initial_scale")
        return ScaleByStddevState(
            zero_count(),
            zeros_like(params, self.mu_dtype),
            full_like(params, initial, self.nu_dtype),
        )

    def update(
        self, grads: Updates, state: ScaleByStddevState, params: Params | None = None
    ) -> tuple[Updates, ScaleByStddevState]:
        del params
        decay = resolve(self.decay, state.count, name="decay")
        eps = resolve(self.eps, state.count, name="eps")
        mu = jax.tree.map(
            lambda g, m: ema(g, m, decay, 1),
            widened(grads, self.mu_dtype),
            widened(state.mu, self.mu_dtype),
        )
        nu = jax.tree.map(
            lambda g, v: ema(g, v, decay, 2),
            widened(grads, self.nu_dtype),
            widened(state.nu, self.nu_dtype),
        )
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
        mu, nu = cast_like(mu, state.mu), cast_like(nu, state.nu)
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
    accumulator_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByRssState:
        initial = resolve(
            self.initial_accumulator_value,
            zero_count(),
            name="initial_accumulator_value",
        )
        sums = full_like(params, initial, self.accumulator_dtype)
        return ScaleByRssState(zero_count(), sums)

    def update(
        self, grads: Updates, state: ScaleByRssState, params: Params | None = None
    ) -> tuple[Updates, ScaleByRssState]:
        del params
        eps = resolve(self.eps, state.count, name="eps")
        sums = jax.tree.map(
            lambda g, t: add(g * g, t),
            widened(grads, self.accumulator_dtype),
            widened(state.sum_of_squares, self.accumulator_dtype),
        )

        def direction(g, t):
            inverse = jnp.where(
                t > 0, jax.lax.rsqrt(t + eps.astype(t.dtype)), jnp.zeros((), t.dtype)
            )
            inverse, g = promote(inverse, g)
            return inverse * g

        updates = jax.tree.map(direction, grads, sums)
        sums = cast_like(sums, state.sum_of_squares)
        return updates, ScaleByRssState(safe_increment(state.count), sums)


def scale_by_rms(
    decay: ScalarOrSchedule = 0.9,
    eps: ScalarOrSchedule = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    nu_dtype: DTypeLike | None = None,
) -> ScaleByRms:
    """Rescale updates by the root of a moving average of squared gradients.

    ``nu_dtype`` stores the average narrower (updated in float32, rounded once).
    """
    return ScaleByRms(
        decay,
        eps,
        initial_scale,
        eps_in_sqrt,
        bias_correction,
        canonical_dtype(nu_dtype, "nu_dtype"),
    )


def scale_by_stddev(
    decay: ScalarOrSchedule = 0.9,
    eps: ScalarOrSchedule = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> ScaleByStddev:
    """Rescale updates by a moving estimate of the gradients' standard deviation.

    ``mu_dtype`` / ``nu_dtype`` store the two averages narrower (updated in
    float32, rounded once).
    """
    return ScaleByStddev(
        decay,
        eps,
        initial_scale,
        eps_in_sqrt,
        bias_correction,
        canonical_dtype(mu_dtype, "mu_dtype"),
        canonical_dtype(nu_dtype, "nu_dtype"),
    )


def scale_by_rss(
    initial_accumulator_value: float = 0.1,
    eps: ScalarOrSchedule = 1e-7,
    *,
    accumulator_dtype: DTypeLike | None = None,
) -> ScaleByRss:
    """Rescale updates by the root of the running sum of squared gradients.

    ``accumulator_dtype`` stores the sum narrower (summed in float32, rounded
    once).
    """
    return ScaleByRss(
        initial_accumulator_value,
        eps,
        canonical_dtype(accumulator_dtype, "accumulator_dtype"),
    )
