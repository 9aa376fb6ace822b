"""Adaptive methods with other memories: NovoGrad, Adan and optimistic gradients.

NovoGrad keeps one second moment per layer, Adan and the optimistic methods
remember the previous gradient.
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
    REAL,
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
    cast,
    cast_like,
    ema,
    promote,
    widened,
    zeros_like,
)

NOVOGRAD_NO_PARAMS = (
    "scale_by_novograd needs the parameters (for its weight decay): call "
    "update(grads, state, params)."
)


class ScaleByNovogradState(eqx.Module):
    count: Array
    mu: Updates
    nu: Updates  # one scalar per parameter leaf (a layer's squared-norm average)


class ScaleByNovograd(AbstractTransform):
    """NovoGrad: momentum of gradients normalised by a per-layer second moment.

    Per parameter leaf (layer), ``v = b2 v + (1 - b2) ||g||**2`` (``v = ||g||**2``
    at the first step) and ``m = b1 m + g / (sqrt(v + eps_root) + eps) + wd p``
    (without ``b1 m`` at the first step); the update is ``m``.

    Ginsburg, Castonguay, Hrinchuk, Kuchaiev, Lavrukhin, Leary, Li, Nguyen, Zhang
    & Cohen, "Stochastic Gradient Methods with Layer-wise Adaptive Moments for
    Training of Deep Networks", arXiv 2019.
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter(
        "eps", NONNEGATIVE, guards_division_with=("eps_root",)
    )
    eps_root: Hyperparameter = hyperparameter("eps_root", NONNEGATIVE)
    weight_decay: Hyperparameter = hyperparameter("weight_decay", REAL)
    mu_dtype: jnp.dtype | None = eqx.field(static=True)

    def init(self, params: Params) -> ScaleByNovogradState:
        nu = jax.tree.map(lambda p: jnp.zeros([], p.dtype), params)
        return ScaleByNovogradState(zero_count(), zeros_like(params, self.mu_dtype), nu)

    def update(
        self,
        grads: Updates,
        state: ScaleByNovogradState,
        params: Params | None = None,
    ) -> tuple[Updates, ScaleByNovogradState]:
        if params is None:
            raise ValueError(NOVOGRAD_NO_PARAMS)
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        eps = resolve(self.eps, state.count, name="eps")
        eps_root = resolve(self.eps_root, state.count, name="eps_root")
        decay = resolve(self.weight_decay, state.count, name="weight_decay")
        count = safe_increment(state.count)
        first = count == 1

        def second(g, v):
            squared = (jnp.linalg.norm(g) ** 2).astype(v.dtype)
            return jnp.where(first, squared, ema(squared, v, b2, 1).astype(v.dtype))

        nu = jax.tree.map(second, grads, state.nu)

        def first_moment(g, p, m, v):
            denom = jnp.sqrt(v + eps_root.astype(v.dtype)) + eps.astype(v.dtype)
            g, denom = promote(g, denom)
            step = add(g / denom, decay.astype(p.dtype) * p)
            step, momentum = promote(step, add(b1.astype(m.dtype) * m, step))
            return jnp.where(first, step, momentum)

        mu = jax.tree.map(first_moment, grads, params, state.mu, nu)
        mu = cast(mu, self.mu_dtype)
        return mu, ScaleByNovogradState(count, cast_like(mu, state.mu), nu)


class ScaleByAdanState(eqx.Module):
    count: Array
    m: Updates
    v: Updates
    n: Updates
    g: Updates


class ScaleByAdan(AbstractTransform):
    """Adan: Adam-like moments of the gradient and of its change between steps.

    With ``d = g - g_prev`` (zero at the first step): ``m = ema(g, b1)``,
    ``v = ema(d, b2)``, ``n = ema((g + (1 - b2) d)**2, b3)``; the update is
    ``(m_hat + (1 - b2) v_hat) / (sqrt(n_hat + eps_root) + eps)``.

    Xie, Zhou, Li, Lin & Yan, "Adan: Adaptive Nesterov Momentum Algorithm for
    Faster Optimizing Deep Models", IEEE TPAMI 2024 (arXiv 2022).

    ``mu_dtype`` stores ``m`` and ``v``, ``nu_dtype`` stores ``n``: each is
    updated in float32 and rounded once when stored. The previous gradient
    stays in the gradient's dtype (the difference ``d`` needs it exact).
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    b3: Hyperparameter = hyperparameter("b3", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter(
        "eps", NONNEGATIVE, guards_division_with=("eps_root",)
    )
    eps_root: Hyperparameter = hyperparameter("eps_root", NONNEGATIVE)
    mu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByAdanState:
        return ScaleByAdanState(
            zero_count(),
            zeros_like(params, self.mu_dtype),
            zeros_like(params, self.mu_dtype),
            zeros_like(params, self.nu_dtype),
            zeros_like(params),
        )

    def update(
        self, grads: Updates, state: ScaleByAdanState, params: Params | None = None
    ) -> tuple[Updates, ScaleByAdanState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        b3 = resolve(self.b3, state.count, name="b3")
        eps = resolve(self.eps, state.count, name="eps")
        eps_root = resolve(self.eps_root, state.count, name="eps_root")
        count = safe_increment(state.count)

        def difference(g, prev):
            d = add(g, -prev.astype(g.dtype))
            return jnp.where(state.count == 0, jnp.zeros_like(d), d)

        diff = jax.tree.map(difference, grads, state.g)
        mu_dtype, nu_dtype = self.mu_dtype, self.nu_dtype
        m = jax.tree.map(
            lambda g, m: ema(g, m, b1, 1),
            widened(grads, mu_dtype),
            widened(state.m, mu_dtype),
        )
        v = jax.tree.map(
            lambda d, v: ema(d, v, b2, 1),
            widened(diff, mu_dtype),
            widened(state.v, mu_dtype),
        )
        n = jax.tree.map(
            lambda g, d, n: ema(add(g, (1 - b2).astype(d.dtype) * d), n, b3, 2),
            widened(grads, nu_dtype),
            widened(diff, nu_dtype),
            widened(state.n, nu_dtype),
        )

        def direction(m, v, n):
            step = add(
                bias_correction(m, b1, count),
                (1 - b2).astype(v.dtype) * bias_correction(v, b2, count),
            )
            n_hat = bias_correction(n, b3, count)
            denom = jnp.sqrt(n_hat + eps_root.astype(n.dtype)) + eps.astype(n.dtype)
            step, denom = promote(step, denom)
            return step / denom

        updates = jax.tree.map(direction, m, v, n)
        new = ScaleByAdanState(
            count,
            cast_like(m, state.m),
            cast_like(v, state.v),
            cast_like(n, state.n),
            cast_like(grads, state.g),
        )
        return updates, new


class ScaleByOptimisticGradientState(eqx.Module):
    count: Array
    previous_gradient: Updates


class ScaleByOptimisticGradient(AbstractTransform):
    """Generalised optimistic gradient: ``(alpha + beta) g_t - beta g_{t-1}``.

    At the first step ``g_{t-1} = g_t``, so the update is ``alpha g``.

    Mokhtari, Ozdaglar & Pattathil, "A Unified Analysis of Extra-gradient and
    Optimistic Gradient Methods for Saddle Point Problems: Proximal Point
    Approach", AISTATS 2020; Daskalakis, Ilyas, Syrgkanis & Zeng, "Training GANs
    with Optimism", ICLR 2018.
    """

    alpha: Hyperparameter = hyperparameter("alpha", NONNEGATIVE)
    beta: Hyperparameter = hyperparameter("beta", NONNEGATIVE)

    def init(self, params: Params) -> ScaleByOptimisticGradientState:
        return ScaleByOptimisticGradientState(zero_count(), zeros_like(params))

    def update(
        self,
        grads: Updates,
        state: ScaleByOptimisticGradientState,
        params: Params | None = None,
    ) -> tuple[Updates, ScaleByOptimisticGradientState]:
        del params
        alpha = resolve(self.alpha, state.count, name="alpha")
        beta = resolve(self.beta, state.count, name="beta")

        def optimistic(g, prev):
            prev = jnp.where(state.count == 0, g, prev.astype(g.dtype))
            return (alpha + beta).astype(g.dtype) * g - beta.astype(g.dtype) * prev

        updates = jax.tree.map(optimistic, grads, state.previous_gradient)
        previous = cast_like(grads, state.previous_gradient)
        return updates, ScaleByOptimisticGradientState(
            safe_increment(state.count), previous
        )


def scale_by_novograd(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.25,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
) -> ScaleByNovograd:
    """NovoGrad's updates: momentum of layer-normalised gradients plus decay."""
    return ScaleByNovograd(
        b1, b2, eps, eps_root, weight_decay, canonical_dtype(mu_dtype, "mu_dtype")
    )


def scale_by_adan(
    b1: ScalarOrSchedule = 0.98,
    b2: ScalarOrSchedule = 0.92,
    b3: ScalarOrSchedule = 0.99,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> ScaleByAdan:
    """Rescale updates by Adan's moments of the gradient and its change.

    ``mu_dtype`` stores ``m`` and ``v``, ``nu_dtype`` stores ``n`` (default:
    each parameter's); both are updated in float32 and rounded when stored.
    """
    return ScaleByAdan(
        b1,
        b2,
        b3,
        eps,
        eps_root,
        canonical_dtype(mu_dtype, "mu_dtype"),
        canonical_dtype(nu_dtype, "nu_dtype"),
    )


def scale_by_optimistic_gradient(
    alpha: ScalarOrSchedule = 1.0, beta: ScalarOrSchedule = 1.0
) -> ScaleByOptimisticGradient:
    """Optimistic gradients: ``(alpha + beta) g_t - beta g_{t-1}``."""
    return ScaleByOptimisticGradient(alpha, beta)
