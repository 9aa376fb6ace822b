"""Adam's relatives from optax.contrib that decouple the step's numerator from its
denominator: ACProp (the previous step's centred second moment) and ADOPT (the
gradient normalised by the previous second moment before the momentum)."""

from __future__ import annotations

from collections.abc import Callable

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
from ._adam_family import ScaleByBeliefState
from ._moments import ScaleByAdamState


class ScaleByAcprop(AbstractTransform):
    """ACProp: the gradient over the *previous* step's centred second moment.

    ``m = b1 m + (1 - b1) g``, ``s = b2 s + (1 - b2) (g - m_prev)**2 + eps_root``,
    update ``g / (sqrt(s_prev / (1 - b2**(t-1))) + eps)`` (``s_prev`` counts as 1
    on the first step).

    Zhuang et al., "Momentum Centering and Asynchronous Update for Adaptive
    Gradient Methods", NeurIPS 2021.

    ``mu_dtype`` / ``nu_dtype`` store ``m`` and ``s``: both are updated and
    used in float32 and rounded once when stored.
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    eps_root: Hyperparameter = hyperparameter("eps_root", NONNEGATIVE)
    mu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByBeliefState:
        return ScaleByBeliefState(
            zero_count(),
            zeros_like(params, self.mu_dtype),
            zeros_like(params, self.nu_dtype),
        )

    def update(
        self, grads: Updates, state: ScaleByBeliefState, params: Params | None = None
    ) -> tuple[Updates, ScaleByBeliefState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        eps = resolve(self.eps, state.count, name="eps")
        eps_root = resolve(self.eps_root, state.count, name="eps_root")
        mu_dtype, nu_dtype = self.mu_dtype, self.nu_dtype
        old_nu = widened(state.nu, nu_dtype)
        mu = jax.tree.map(
            lambda g, m: ema(g, m, b1, 1),
            widened(grads, mu_dtype),
            widened(state.mu, mu_dtype),
        )

        def second(g, m, s):
            s = ema(add(g, -m), s, b2, 2)
            return s + eps_root.astype(s.dtype)

        nu = jax.tree.map(
            second,
            widened(grads, nu_dtype),
            widened(state.mu, nu_dtype),
            old_nu,
        )
        count = safe_increment(state.count)
        first = state.count == 0
        t = jnp.where(first, count, state.count)

        def step(g, s):
            s_hat = bias_correction(s, b2, t)
            s_hat = jnp.where(first, jnp.ones_like(s_hat), s_hat)
            g, denom = promote(g, jnp.sqrt(s_hat) + eps.astype(s_hat.dtype))
            return g / denom

        updates = jax.tree.map(step, grads, old_nu)
        return updates, ScaleByBeliefState(
            count, cast_like(mu, state.mu), cast_like(nu, state.nu)
        )


def scale_by_acprop(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-16,
    eps_root: ScalarOrSchedule = 1e-16,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> ScaleByAcprop:
    """Rescale updates by ACProp's asynchronous centred second moment.

    ``mu_dtype`` / ``nu_dtype``: the dtypes the two moments are stored in
    (default: each parameter's); a non-floating dtype is an error.
    """
    return ScaleByAcprop(
        b1,
        b2,
        eps,
        eps_root,
        canonical_dtype(mu_dtype, "mu_dtype"),
        canonical_dtype(nu_dtype, "nu_dtype"),
    )


def quarter_power(count: Array) -> Array:
    """ADOPT's default clipping bound at step ``count``: ``count ** 0.25``."""
    return jnp.asarray(count).astype(jnp.float32) ** 0.25


class ScaleByAdopt(AbstractTransform):
    """ADOPT: momentum of the gradient normalised by the previous second moment.

    ``n = g / max(sqrt(v_prev), eps)`` (clipped to ``±clip_value_fn(t)`` with
    ``use_clipping``), ``m = b1 m + (1 - b1) n``, ``v = b2 v + (1 - b2) g**2``;
    the first step only sets ``v = g**2`` and ``m = n``. The update is ``m``
    (Nesterov: ``b1 m + (1 - b1) n``). ``clip_value_fn`` is structure (static):
    a new function compiles again.

    Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the
    Optimal Rate", NeurIPS 2024.

    ``mu_dtype`` stores ``m`` as optax does; ``nu_dtype`` stores ``v``, updated
    and used in float32 and rounded once when stored.
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    mu_dtype: jnp.dtype | None = eqx.field(static=True)
    nesterov: bool = eqx.field(static=True)
    use_clipping: bool = eqx.field(static=True)
    clip_value_fn: Callable[[Array], Array] = eqx.field(static=True)
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
        started = state.count > 0
        # as optax: where() of the betas, so ``1 - b`` is a float32 subtraction
        b1 = jnp.where(started, resolve(self.b1, state.count, name="b1"), 1.0)
        b2 = jnp.where(started, resolve(self.b2, state.count, name="b2"), 0.0)
        eps = resolve(self.eps, state.count, name="eps")
        old_nu = widened(state.nu, self.nu_dtype)
        nu = jax.tree.map(
            lambda g, v: ema(g, v, b2, 2), widened(grads, self.nu_dtype), old_nu
        )
        bound = None
        if self.use_clipping:
            bound = jnp.asarray(self.clip_value_fn(state.count))

        def normalised(g, v):
            root = jnp.maximum(jnp.sqrt(v), eps.astype(v.dtype))
            g, root = promote(g, root)
            n = g / root
            if bound is None:
                return n
            return jnp.clip(n, -bound.astype(n.dtype), bound.astype(n.dtype))

        steps = jax.tree.map(normalised, grads, old_nu)
        mu = jax.tree.map(lambda n, m: ema(n, m, b1, 1), steps, state.mu)
        updates = mu
        if self.nesterov:
            updates = jax.tree.map(lambda n, m: ema(n, m, b1, 1), steps, mu)
        mu = cast(mu, self.mu_dtype) if self.mu_dtype else cast_like(mu, state.mu)
        nu = cast_like(nu, state.nu)
        return updates, ScaleByAdamState(safe_increment(state.count), mu, nu)


def scale_by_adopt(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.9999,
    eps: ScalarOrSchedule = 1e-6,
    mu_dtype: DTypeLike | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[Array], Array] = quarter_power,
    nu_dtype: DTypeLike | None = None,
) -> ScaleByAdopt:
    """Rescale updates by ADOPT (clipped by ``clip_value_fn(count)`` by default).

    ``mu_dtype`` (optax's) / ``nu_dtype``: the dtypes the two moments are
    stored in (default: each parameter's).
    """
    return ScaleByAdopt(
        b1,
        b2,
        eps,
        canonical_dtype(mu_dtype, "mu_dtype"),
        nesterov,
        use_clipping,
        clip_value_fn,
        canonical_dtype(nu_dtype, "nu_dtype"),
    )
