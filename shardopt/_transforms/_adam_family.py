"""Adam's relatives that keep its two moments: Adamax, AMSGrad, AdaBelief, Yogi, RAdam.

Each rescales a bias-corrected first moment by a second statistic of the
gradients; they differ in what that statistic is and how it is updated.
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
    full_like,
    promote,
    widened,
    zeros_like,
)
from ._moments import ScaleByAdamState


def _nesterov_first_moment(
    mu: Updates, grads: Updates, b1: Array, count: Array
) -> Updates:
    """Nadam's look-ahead first moment at step ``count`` (already incremented).

    ``b1 * mu / (1 - b1**(count+1)) + (1 - b1) * g / (1 - b1**count)``.
    """

    def one(m, g):
        m_next = bias_correction(m, b1, safe_increment(count))
        g_hat = bias_correction(g, b1, count)
        return add(b1.astype(m.dtype) * m_next, (1 - b1).astype(g.dtype) * g_hat)

    return jax.tree.map(one, mu, grads)


def _divide(numerator: Array, denominator: Array) -> Array:
    numerator, denominator = promote(numerator, denominator)
    return numerator / denominator


def _root_plus_eps(v: Array, eps_root: Array, eps: Array) -> Array:
    """``sqrt(v + eps_root) + eps``, the scalars in ``v``'s dtype."""
    return jnp.sqrt(v + eps_root.astype(v.dtype)) + eps.astype(v.dtype)


class ScaleByAdamax(AbstractTransform):
    """Adamax: the first moment over an exponentially decayed infinity norm.

    ``m = b1 m + (1 - b1) g``, ``u = max(|g| + eps, b2 u)``,
    update ``m / (1 - b1**t) / u``.

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, §7.1.
    """

    elementwise = True

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE, guards_division_with=())
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    mu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByAdamState:
        nu = zeros_like(params, self.nu_dtype)
        return ScaleByAdamState(zero_count(), zeros_like(params, self.mu_dtype), nu)

    def update(
        self, grads: Updates, state: ScaleByAdamState, params: Params | None = None
    ) -> tuple[Updates, ScaleByAdamState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        eps = resolve(self.eps, state.count, name="eps")
        count = safe_increment(state.count)
        mu = jax.tree.map(
            lambda g, m: ema(g, m, b1, 1),
            widened(grads, self.mu_dtype),
            widened(state.mu, self.mu_dtype),
        )
        nu = jax.tree.map(
            lambda g, u: jnp.maximum(
                *promote(jnp.abs(g) + eps.astype(g.dtype), b2.astype(u.dtype) * u)
            ),
            widened(grads, self.nu_dtype),
            widened(state.nu, self.nu_dtype),
        )
        updates = jax.tree.map(
            lambda m, u: _divide(bias_correction(m, b1, count), u), mu, nu
        )
        mu = cast_like(mu, state.mu)
        nu = cast_like(nu, state.nu)
        return updates, ScaleByAdamState(count, mu, nu)


class ScaleByAmsgradState(eqx.Module):
    count: Array
    mu: Updates
    nu: Updates
    nu_max: Updates


class ScaleByAmsgrad(AbstractTransform):
    """AMSGrad: Adam whose denominator uses the running maximum of the second moment.

    ``v_max = max(v_max, v_hat)``, update ``m_hat / (sqrt(v_max + eps_root) + eps)``;
    without bias correction (``bias_correction_mu/nu=False``) it is the paper's.

    Reddi, Kale & Kumar, "On the Convergence of Adam and Beyond", ICLR 2018.
    """

    elementwise = True

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter(
        "eps", NONNEGATIVE, guards_division_with=("eps_root",)
    )
    eps_root: Hyperparameter = hyperparameter("eps_root", NONNEGATIVE)
    mu_dtype: jnp.dtype | None = eqx.field(static=True)
    bias_correction_mu: bool = eqx.field(static=True)
    bias_correction_nu: bool = eqx.field(static=True)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByAmsgradState:
        return ScaleByAmsgradState(
            zero_count(),
            zeros_like(params, self.mu_dtype),
            zeros_like(params, self.nu_dtype),
            zeros_like(params, self.nu_dtype),
        )

    def update(
        self, grads: Updates, state: ScaleByAmsgradState, params: Params | None = None
    ) -> tuple[Updates, ScaleByAmsgradState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        eps = resolve(self.eps, state.count, name="eps")
        eps_root = resolve(self.eps_root, state.count, name="eps_root")
        count = safe_increment(state.count)
        mu = jax.tree.map(lambda g, m: ema(g, m, b1, 1), grads, state.mu)
        nu = jax.tree.map(
            lambda g, v: ema(g, v, b2, 2),
            widened(grads, self.nu_dtype),
            widened(state.nu, self.nu_dtype),
        )
        mu_hat = mu
        if self.bias_correction_mu:
            mu_hat = jax.tree.map(lambda m: bias_correction(m, b1, count), mu)
        nu_eff = nu
        if self.bias_correction_nu:
            nu_eff = jax.tree.map(lambda v: bias_correction(v, b2, count), nu)
        nu_max = jax.tree.map(
            lambda old, v: jnp.maximum(*promote(old, v)),
            widened(state.nu_max, self.nu_dtype),
            nu_eff,
        )
        updates = jax.tree.map(
            lambda m, v: _divide(m, _root_plus_eps(v, eps_root, eps)), mu_hat, nu_max
        )
        mu = cast(mu, self.mu_dtype)
        nu = cast_like(nu, state.nu)
        nu_max = cast_like(nu_max, state.nu_max)
        return updates, ScaleByAmsgradState(count, mu, nu, nu_max)


class ScaleByBeliefState(eqx.Module):
    count: Array
    mu: Updates
    nu: Updates


class ScaleByBelief(AbstractTransform):
    """AdaBelief: Adam with the second moment of the gradient's surprise ``g - m``.

    ``s = b2 s + (1 - b2) (g - m)**2 + eps_root``, update
    ``m_hat / (sqrt(s_hat) + eps)``; ``nesterov=True`` uses Nadam's ``m_hat``.

    Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris & Duncan, "AdaBelief
    Optimizer: Adapting Stepsizes by the Belief in Observed Gradients",
    NeurIPS 2020.
    """

    elementwise = True

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter(
        "eps", NONNEGATIVE, guards_division_with=("eps_root",)
    )
    eps_root: Hyperparameter = hyperparameter("eps_root", NONNEGATIVE)
    nesterov: bool = eqx.field(static=True)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    mu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByBeliefState:
        nu = zeros_like(params, self.nu_dtype)
        return ScaleByBeliefState(zero_count(), zeros_like(params, self.mu_dtype), nu)

    def update(
        self, grads: Updates, state: ScaleByBeliefState, params: Params | None = None
    ) -> tuple[Updates, ScaleByBeliefState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        eps = resolve(self.eps, state.count, name="eps")
        eps_root = resolve(self.eps_root, state.count, name="eps_root")
        count = safe_increment(state.count)
        mu = jax.tree.map(
            lambda g, m: ema(g, m, b1, 1),
            widened(grads, self.mu_dtype),
            widened(state.mu, self.mu_dtype),
        )

        def surprise(g, m, s):
            s = ema(add(g, -m), s, b2, 2)
            return s + eps_root.astype(s.dtype)

        nu = jax.tree.map(
            surprise,
            widened(grads, self.nu_dtype),
            widened(mu, self.nu_dtype),
            widened(state.nu, self.nu_dtype),
        )
        if self.nesterov:
            mu_hat = _nesterov_first_moment(mu, grads, b1, count)
        else:
            mu_hat = jax.tree.map(lambda m: bias_correction(m, b1, count), mu)
        updates = jax.tree.map(
            lambda m, s: _divide(
                m, jnp.sqrt(bias_correction(s, b2, count)) + eps.astype(s.dtype)
            ),
            mu_hat,
            nu,
        )
        mu = cast_like(mu, state.mu)
        nu = cast_like(nu, state.nu)
        return updates, ScaleByBeliefState(count, mu, nu)


class ScaleByYogi(AbstractTransform):
    """Yogi: Adam whose second moment moves additively, by the sign of ``v - g**2``.

    ``v = v - (1 - b2) sign(v - g**2) g**2``, update
    ``m_hat / (sqrt(v_hat + eps_root) + eps)``; both moments start at
    ``initial_accumulator_value``.

    Zaheer, Reddi, Sachan, Kale & Kumar, "Adaptive Methods for Nonconvex
    Optimization", NeurIPS 2018.
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter(
        "eps", NONNEGATIVE, guards_division_with=("eps_root",)
    )
    eps_root: Hyperparameter = hyperparameter("eps_root", NONNEGATIVE)
    initial_accumulator_value: Hyperparameter = hyperparameter(
        "initial_accumulator_value", POSITIVE
    )
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    mu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByAdamState:
        initial = resolve(
            self.initial_accumulator_value,
            zero_count(),
            name="initial_accumulator_value",
        )
        return ScaleByAdamState(
            zero_count(),
            full_like(params, initial, self.mu_dtype),
            full_like(params, initial, self.nu_dtype),
        )

    def update(
        self, grads: Updates, state: ScaleByAdamState, params: Params | None = None
    ) -> tuple[Updates, ScaleByAdamState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        eps = resolve(self.eps, state.count, name="eps")
        eps_root = resolve(self.eps_root, state.count, name="eps_root")
        count = safe_increment(state.count)
        mu = jax.tree.map(
            lambda g, m: ema(g, m, b1, 1),
            widened(grads, self.mu_dtype),
            widened(state.mu, self.mu_dtype),
        )

        def second(g, v):
            g2, v = promote(g * g, v)
            return v - (1 - b2).astype(v.dtype) * jnp.sign(v - g2) * g2

        nu = jax.tree.map(
            second, widened(grads, self.nu_dtype), widened(state.nu, self.nu_dtype)
        )
        updates = jax.tree.map(
            lambda m, v: _divide(
                bias_correction(m, b1, count),
                _root_plus_eps(bias_correction(v, b2, count), eps_root, eps),
            ),
            mu,
            nu,
        )
        mu = cast_like(mu, state.mu)
        nu = cast_like(nu, state.nu)
        return updates, ScaleByAdamState(count, mu, nu)


class ScaleByRadam(AbstractTransform):
    """RAdam: Adam with its step rectified by the variance of the adaptive rate.

    With ``rho_inf = 2 / (1 - b2) - 1`` and ``rho_t = rho_inf - 2 t b2**t /
    (1 - b2**t)``, the update is ``r_t m_hat / (sqrt(v_hat + eps_root) + eps)``,
    ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2)
    rho_t))``, where ``rho_t >= threshold``, and plain momentum ``m_hat`` before.

    Liu, Jiang, He, Chen, Liu, Gao & Han, "On the Variance of the Adaptive
    Learning Rate and Beyond", ICLR 2020.
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter(
        "eps", NONNEGATIVE, guards_division_with=("eps_root",)
    )
    eps_root: Hyperparameter = hyperparameter("eps_root", NONNEGATIVE)
    threshold: Hyperparameter = hyperparameter("threshold", REAL)
    nesterov: bool = eqx.field(static=True)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    mu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByAdamState:
        nu = zeros_like(params, self.nu_dtype)
        return ScaleByAdamState(zero_count(), zeros_like(params, self.mu_dtype), nu)

    def update(
        self, grads: Updates, state: ScaleByAdamState, params: Params | None = None
    ) -> tuple[Updates, ScaleByAdamState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        eps = resolve(self.eps, state.count, name="eps")
        eps_root = resolve(self.eps_root, state.count, name="eps_root")
        threshold = resolve(self.threshold, state.count, name="threshold")
        count = safe_increment(state.count)
        mu = jax.tree.map(
            lambda g, m: ema(g, m, b1, 1),
            widened(grads, self.mu_dtype),
            widened(state.mu, self.mu_dtype),
        )
        nu = jax.tree.map(
            lambda g, v: ema(g, v, b2, 2),
            widened(grads, self.nu_dtype),
            widened(state.nu, self.nu_dtype),
        )

        rho_inf = 2 / (1 - b2) - 1
        b2t = b2 ** count.astype(b2.dtype)
        rho = rho_inf - 2 * count.astype(b2.dtype) * b2t / (1 - b2t)
        rect = jnp.sqrt(
            (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
        )
        if self.nesterov:
            mu_hat = _nesterov_first_moment(mu, grads, b1, count)
        else:
            mu_hat = jax.tree.map(lambda m: bias_correction(m, b1, count), mu)

        def direction(m, v):
            v_hat = bias_correction(v, b2, count)
            denom = _root_plus_eps(v_hat, eps_root, eps)
            rectified = _divide(rect.astype(m.dtype) * m, denom)
            m = m.astype(rectified.dtype)
            return jnp.where(rho >= threshold, rectified, m)

        updates = jax.tree.map(direction, mu_hat, nu)
        mu = cast_like(mu, state.mu)
        nu = cast_like(nu, state.nu)
        return updates, ScaleByAdamState(count, mu, nu)


def scale_by_adamax(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    *,
    nu_dtype: DTypeLike | None = None,
    mu_dtype: DTypeLike | None = None,
) -> ScaleByAdamax:
    """Rescale updates by Adamax's first moment over a decayed infinity norm.

    ``nu_dtype`` stores the infinity norm narrower, ``mu_dtype`` the first
    moment (each updated in float32, rounded once).
    """
    return ScaleByAdamax(
        b1,
        b2,
        eps,
        canonical_dtype(nu_dtype, "nu_dtype"),
        canonical_dtype(mu_dtype, "mu_dtype"),
    )


def scale_by_amsgrad(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype: DTypeLike | None = None,
) -> ScaleByAmsgrad:
    """Rescale updates by AMSGrad's first moment over the maximum second moment.

    ``nu_dtype`` stores the second moment and its maximum narrower (updated in
    float32, rounded once).
    """
    return ScaleByAmsgrad(
        b1,
        b2,
        eps,
        eps_root,
        canonical_dtype(mu_dtype, "mu_dtype"),
        bias_correction_mu,
        bias_correction_nu,
        canonical_dtype(nu_dtype, "nu_dtype"),
    )


def scale_by_belief(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-16,
    eps_root: ScalarOrSchedule = 1e-16,
    *,
    nesterov: bool = False,
    nu_dtype: DTypeLike | None = None,
    mu_dtype: DTypeLike | None = None,
) -> ScaleByBelief:
    """Rescale updates by AdaBelief's moments (of the gradient and its surprise).

    ``nu_dtype`` stores the surprise's second moment narrower, ``mu_dtype``
    the first moment (each updated in float32, rounded once).
    """
    return ScaleByBelief(
        b1,
        b2,
        eps,
        eps_root,
        nesterov,
        canonical_dtype(nu_dtype, "nu_dtype"),
        canonical_dtype(mu_dtype, "mu_dtype"),
    )


def scale_by_yogi(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-3,
    eps_root: ScalarOrSchedule = 0.0,
    initial_accumulator_value: ScalarOrSchedule = 1e-6,
    *,
    nu_dtype: DTypeLike | None = None,
    mu_dtype: DTypeLike | None = None,
) -> ScaleByYogi:
    """Rescale updates by Yogi's moments (an additively updated second moment).

    ``nu_dtype`` stores the second moment narrower, ``mu_dtype`` the first
    (each updated in float32, rounded once).
    """
    return ScaleByYogi(
        b1,
        b2,
        eps,
        eps_root,
        initial_accumulator_value,
        canonical_dtype(nu_dtype, "nu_dtype"),
        canonical_dtype(mu_dtype, "mu_dtype"),
    )


def scale_by_radam(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    threshold: ScalarOrSchedule = 5.0,
    *,
    nesterov: bool = False,
    nu_dtype: DTypeLike | None = None,
    mu_dtype: DTypeLike | None = None,
) -> ScaleByRadam:
    """Rescale updates by Rectified Adam's moments.

    ``nu_dtype`` stores the second moment narrower, ``mu_dtype`` the first
    (each updated in float32, rounded once).
    """
    return ScaleByRadam(
        b1,
        b2,
        eps,
        eps_root,
        threshold,
        nesterov,
        canonical_dtype(nu_dtype, "nu_dtype"),
        canonical_dtype(mu_dtype, "mu_dtype"),
    )
