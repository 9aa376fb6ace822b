"""Moving averages of the gradients: heavy-ball momentum and Adam."""

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
    cast,
    cast_like,
    ema,
    promote,
    widened,
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

    elementwise = True

    decay: Hyperparameter = hyperparameter("decay", UNIT_INTERVAL)
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

    ``mu_dtype`` stores the first moment as optax does (its update as optax
    computes it); ``nu_dtype`` stores the second moment: ``nu`` is updated in
    float32 (``g`` and the stored ``nu`` widened) and rounded once when stored.
    """

    elementwise = True

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter(
        "eps", NONNEGATIVE, guards_division_with=("eps_root",)
    )
    eps_root: Hyperparameter = hyperparameter("eps_root", NONNEGATIVE)
    mu_dtype: jnp.dtype | None = eqx.field(static=True)
    nesterov: bool = eqx.field(static=True)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByAdamState:
        return ScaleByAdamState(
            zero_count(),
            zeros_like(params, self.mu_dtype),
            zeros_like(params, self.nu_dtype),
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
        nu = jax.tree.map(
            lambda g, v: ema(g, v, b2, 2),
            widened(grads, self.nu_dtype),
            widened(state.nu, self.nu_dtype),
        )
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


def trace(
    decay: ScalarOrSchedule,
    nesterov: bool = False,
    accumulator_dtype: DTypeLike | None = None,
) -> Trace:
    """Momentum: ``trace = g + decay * trace``, emitted as is or Nesterov-style."""
    return Trace(
        decay, nesterov, canonical_dtype(accumulator_dtype, "accumulator_dtype")
    )


def scale_by_adam(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-8,
    eps_root: ScalarOrSchedule = 0.0,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: DTypeLike | None = None,
) -> ScaleByAdam:
    """Rescale updates by Adam's bias-corrected moments.

    ``mu_dtype`` / ``nu_dtype``: the dtypes the first and second moments are
    stored in (default: each parameter's); a non-floating dtype is an error.
    """
    return ScaleByAdam(
        b1,
        b2,
        eps,
        eps_root,
        canonical_dtype(mu_dtype, "mu_dtype"),
        nesterov,
        canonical_dtype(nu_dtype, "nu_dtype"),
    )
