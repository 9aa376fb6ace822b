"""AdEMAMix and its simplified form: Adam with a second, slow momentum mixed in."""

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
    promote,
    widened,
    zeros_like,
)


def _over_root(numerator: Array, v: Array, eps_root: Array, eps: Array) -> Array:
    """``numerator / (sqrt(v + eps_root) + eps)``, the scalars in ``v``'s dtype."""
    denom = jnp.sqrt(v + eps_root.astype(v.dtype)) + eps.astype(v.dtype)
    numerator, denom = promote(numerator, denom)
    return numerator / denom


class ScaleByAdemamixState(eqx.Module):
    count: Array  # the fast moment's and the second moment's step count
    count_m2: Array  # the slow moment's count, at which b3 and alpha are read
    m1: Updates  # the fast EMA of the gradients
    m2: Updates  # the slow EMA of the gradients
    nu: Updates  # the EMA of the squared gradients


class ScaleByAdemamix(AbstractTransform):
    """AdEMAMix: ``(m1_hat + alpha m2) / (sqrt(nu_hat + eps_root) + eps)``.

    ``m1`` and ``nu`` are Adam's moments (bias-corrected), ``m2 = b3 m2 + (1 - b3)
    g`` a slow EMA without bias correction; all three are kept in ``mu_dtype``.

    Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster,
    Older", ICLR 2025 (arXiv 2024).
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    b3: Hyperparameter = hyperparameter("b3", UNIT_INTERVAL)
    alpha: Hyperparameter = hyperparameter("alpha")
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    eps_root: Hyperparameter = hyperparameter("eps_root", NONNEGATIVE)
    mu_dtype: jnp.dtype | None = eqx.field(static=True)

    def init(self, params: Params) -> ScaleByAdemamixState:
        return ScaleByAdemamixState(
            zero_count(),
            zero_count(),
            zeros_like(params, self.mu_dtype),
            zeros_like(params, self.mu_dtype),
            zeros_like(params, self.mu_dtype),
        )

    def update(
        self, grads: Updates, state: ScaleByAdemamixState, params: Params | None = None
    ) -> tuple[Updates, ScaleByAdemamixState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        eps = resolve(self.eps, state.count, name="eps")
        eps_root = resolve(self.eps_root, state.count, name="eps_root")
        b3 = resolve(self.b3, state.count_m2, name="b3")
        alpha = resolve(self.alpha, state.count_m2, name="alpha")
        m1 = jax.tree.map(lambda g, m: ema(g, m, b1, 1), grads, state.m1)
        m2 = jax.tree.map(lambda g, m: ema(g, m, b3, 1), grads, state.m2)
        nu = jax.tree.map(lambda g, v: ema(g, v, b2, 2), grads, state.nu)
        count = safe_increment(state.count)

        def step(fast, slow, v):
            mixed = add(
                bias_correction(fast, b1, count), alpha.astype(slow.dtype) * slow
            )
            return _over_root(mixed, bias_correction(v, b2, count), eps_root, eps)

        updates = jax.tree.map(step, m1, m2, nu)
        return updates, ScaleByAdemamixState(
            count,
            safe_increment(state.count_m2),
            cast_like(m1, state.m1),
            cast_like(m2, state.m2),
            cast_like(nu, state.nu),
        )


def scale_by_ademamix(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 6.0,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
) -> ScaleByAdemamix:
    """Rescale updates by AdEMAMix's mixture of a fast and a slow momentum."""
    return ScaleByAdemamix(
        b1, b2, b3, alpha, eps, eps_root, canonical_dtype(mu_dtype, "mu_dtype")
    )


class ScaleBySimplifiedAdEMAMixState(eqx.Module):
    t: Array  # the step count
    m: Updates  # the (undamped) momentum sum ``g + b1 m``
    n: Updates  # the EMA of the squared gradients


class ScaleBySimplifiedAdemamix(AbstractTransform):
    """Simplified AdEMAMix: ``(m + alpha g) / (sqrt(n_hat + eps_root) + eps)``.

    ``m = g + b1 m`` (no ``1 - b1`` damping), ``n = g**2 + b2 (n - g**2)``
    bias-corrected by ``1 - b2**t``; ``alpha = 0`` is Adam with a rescaled
    learning rate and ``b1``.

    Morwani, Vyas, Kakade & Mohri, "Connections between Schedule-Free
    Optimizers, AdEMAMix, and Accelerated SGD Variants", arXiv 2025.

    ``mu_dtype`` / ``nu_dtype`` store ``m`` and ``n``: both are updated and
    used in float32 and rounded once when stored.
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    alpha: Hyperparameter = hyperparameter("alpha")
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    eps_root: Hyperparameter = hyperparameter("eps_root", NONNEGATIVE)
    mu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleBySimplifiedAdEMAMixState:
        return ScaleBySimplifiedAdEMAMixState(
            zero_count(),
            zeros_like(params, self.mu_dtype),
            zeros_like(params, self.nu_dtype),
        )

    def update(
        self,
        grads: Updates,
        state: ScaleBySimplifiedAdEMAMixState,
        params: Params | None = None,
    ) -> tuple[Updates, ScaleBySimplifiedAdEMAMixState]:
        del params
        b1 = resolve(self.b1, state.t, name="b1")
        b2 = resolve(self.b2, state.t, name="b2")
        alpha = resolve(self.alpha, state.t, name="alpha")
        eps = resolve(self.eps, state.t, name="eps")
        eps_root = resolve(self.eps_root, state.t, name="eps_root")
        m = jax.tree.map(
            lambda g, m: add(g, b1.astype(m.dtype) * m),
            widened(grads, self.mu_dtype),
            widened(state.m, self.mu_dtype),
        )

        def second(g, n):
            g2 = g * g
            return add(g2, b2.astype(n.dtype) * add(n, -g2))

        n = jax.tree.map(
            second, widened(grads, self.nu_dtype), widened(state.n, self.nu_dtype)
        )
        t = safe_increment(state.t)

        def step(m, g, n):
            numerator = add(m, alpha.astype(g.dtype) * g)
            return _over_root(numerator, bias_correction(n, b2, t), eps_root, eps)

        updates = jax.tree.map(step, m, grads, n)
        m = cast_like(m, state.m)
        n = cast_like(n, state.n)
        return updates, ScaleBySimplifiedAdEMAMixState(t, m, n)


def scale_by_simplified_ademamix(
    b1: ScalarOrSchedule = 0.99,
    b2: ScalarOrSchedule = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> ScaleBySimplifiedAdemamix:
    """Rescale updates by simplified AdEMAMix (one undamped momentum).

    ``mu_dtype`` / ``nu_dtype``: the dtypes ``m`` and ``n`` are stored in
    (default: each parameter's); a non-floating dtype is an error.
    """
    return ScaleBySimplifiedAdemamix(
        b1,
        b2,
        alpha,
        eps,
        eps_root,
        canonical_dtype(mu_dtype, "mu_dtype"),
        canonical_dtype(nu_dtype, "nu_dtype"),
    )
