"""Sophia's scaling and the Hutchinson estimate of the Hessian's diagonal.

The estimate needs the objective: pass ``obj_fn=`` (a function of the
parameters alone, returning the scalar loss) to ``Optimizer.step``, which
hands it to the estimator. Its random signs come from a key carried in the
state, split as optax splits it, so the numbers are optax's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike

from .._base import (
    AbstractTransform,
    Params,
    State,
    Updates,
    safe_increment,
    update_with_extra_args,
    zero_count,
)
from .._hyperparams import (
    NONNEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    Hyperparameter,
    as_hyperparameter,
    hyperparameter,
    resolve,
)
from .._interop import as_transform
from .._tree_math import (
    bias_correction,
    canonical_dtype,
    cast_like,
    ema,
    promote,
    widened,
    zeros_like,
)
from ._conditional import check_bool, check_int


class HutchinsonState(eqx.Module):
    key: Array  # the key's raw data (uint32), so it saves and shards as an array


class HutchinsonEstimator(AbstractTransform):
    """The Hessian's diagonal, estimated as ``z * (H z)`` with Rademacher ``z``.

    ``H z`` is a Hessian-vector product of ``obj_fn`` at the parameters
    (forward over reverse mode). Unbiased, with high variance. Hutchinson, "A
    stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", 1989.
    """

    key_data: Array = eqx.field(converter=jnp.asarray)
    key_impl: str = eqx.field(static=True)
    takes_extra_args = True

    def init(self, params: Params) -> HutchinsonState:
        del params
        return HutchinsonState(self.key_data)

    def update(
        self,
        grads: Updates,
        state: HutchinsonState,
        params: Params | None = None,
        obj_fn: Callable[[Params], Array] | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, HutchinsonState]:
        del grads, extra_args
        if params is None:
            raise ValueError("params must be provided to hutchinson update function.")
        if obj_fn is None:
            raise ValueError(
                "obj_fn must be provided to hutchinson update function: pass "
                "obj_fn=lambda params: loss(params, batch) to Optimizer.step"
            )
        key = jax.random.wrap_key_data(state.key, impl=self.key_impl)
        key, subkey = jax.random.split(key)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(subkey, len(leaves))
        # optax casts the signs to the tree's lowest dtype; per leaf is the same
        # for one dtype and also works for mixed trees (where jvp needs it)
        signs = [
            jax.random.rademacher(k, p.shape, jnp.float32).astype(p.dtype)
            for p, k in zip(leaves, keys, strict=True)
        ]
        signs = jax.tree.unflatten(treedef, signs)
        hvp = jax.jvp(jax.grad(obj_fn), (params,), (signs,))[1]
        product = jax.tree.map(lambda h, r: h * r, hvp, signs)
        return product, HutchinsonState(jax.random.key_data(key))


def _as_key(key: ArrayLike | None) -> Array:
    if key is None:
        return jax.random.PRNGKey(0)
    if isinstance(key, int):
        return jax.random.key(key)
    return jnp.asarray(key) if not isinstance(key, jax.Array) else key


def hutchinson_estimator_diag_hessian(
    random_seed: ArrayLike | None = None,
) -> HutchinsonEstimator:
    """Hutchinson's estimate of the Hessian diagonal: ``z * (H z)``, ``z`` ±1.

    ``random_seed`` is a PRNG key (typed or raw, as optax takes it) or an int
    seed; without it, ``jax.random.PRNGKey(0)`` as in optax. Needs ``obj_fn=``
    at every update. Hutchinson, "A stochastic estimator of the trace of the
    influence matrix for Laplacian smoothing splines", 1989.
    """
    key = _as_key(random_seed)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"random_seed must be one key, got shape {key.shape}")
        return HutchinsonEstimator(
            jax.random.key_data(key), str(jax.random.key_impl(key))
        )
    impl = jax.random.key_impl(jax.random.wrap_key_data(key))  # checks the shape
    return HutchinsonEstimator(key, str(impl))


def _optional_clip(value: Any) -> Hyperparameter | None:
    """``None`` (no clipping) or a positive hyperparameter."""
    if value is None:
        return None
    return as_hyperparameter(value, name="clip_threshold", domain=POSITIVE)


class SophiaState(eqx.Module):
    count: Array
    mu: Updates  # momentum
    nu: Updates  # moving average of the Hessian's diagonal
    hessian_fn_state: State


class ScaleBySophia(AbstractTransform):
    r"""Sophia's update: momentum over a clipped diagonal-Hessian estimate.

    ``m = b1 m + (1 - b1) g``; ``u = clip(\hat m / \max(\gamma h, eps), \pm c)``
    with ``\hat m`` bias-corrected and ``h`` the moving average (``b2``) of the
    Hessian-diagonal estimate, refreshed every ``update_interval`` steps from
    the state before this step's. Liu et al., "Sophia: A Scalable Stochastic
    Second-order Optimizer for Language Model Pre-training", ICLR 2024.
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    gamma: Hyperparameter = hyperparameter("gamma", NONNEGATIVE)
    clip_threshold: Hyperparameter | None = eqx.field(
        converter=_optional_clip, metadata={"hyperparameter": {"domain": POSITIVE}}
    )
    update_interval: int = eqx.field(static=True)
    hessian_diagonal_fn: AbstractTransform
    mu_dtype: jnp.dtype | None = eqx.field(static=True)
    verbose: bool = eqx.field(static=True)
    print_win_rate_every_n_steps: int = eqx.field(static=True)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    takes_extra_args = True

    def init(self, params: Params) -> SophiaState:
        return SophiaState(
            zero_count(),
            zeros_like(params, self.mu_dtype),
            zeros_like(params, self.nu_dtype),
            self.hessian_diagonal_fn.init(params),
        )

    def update(
        self,
        grads: Updates,
        state: SophiaState,
        params: Params | None = None,
        **hess_fn_kwargs: Any,
    ) -> tuple[Updates, SophiaState]:
        if params is None:
            raise ValueError("params must be provided to sophia's update function.")
        count = safe_increment(state.count)
        at = lambda name: resolve(getattr(self, name), state.count, name=name)
        b1, b2, eps, gamma = at("b1"), at("b2"), at("eps"), at("gamma")
        mu = jax.tree.map(lambda g, m: ema(g, m, b1, 1), grads, state.mu)

        def scaled(m, h):
            m_hat = bias_correction(m, b1, count)
            bound = jnp.maximum(gamma.astype(h.dtype) * h, eps.astype(h.dtype))
            m_hat, bound = promote(m_hat, bound)
            return m_hat / bound

        old_nu = widened(state.nu, self.nu_dtype)
        updates = jax.tree.map(scaled, mu, old_nu)
        if self.clip_threshold is not None:
            c = at("clip_threshold")
            if self.verbose and self.print_win_rate_every_n_steps > 0:
                self._print_win_rate(updates, c, count)
            updates = jax.tree.map(
                lambda u: jnp.clip(u, -c.astype(u.dtype), c.astype(u.dtype)), updates
            )

        def refresh(hess_state, nu):
            diag, hess_state = update_with_extra_args(
                self.hessian_diagonal_fn, grads, hess_state, params, hess_fn_kwargs
            )
            nu = jax.tree.map(lambda d, n: ema(d, n, b2, 1).astype(n.dtype), diag, nu)
            return hess_state, nu

        hess_state, nu = jax.lax.cond(
            state.count % self.update_interval == 0,
            refresh,
            lambda h, n: (h, n),
            state.hessian_fn_state,
            old_nu,
        )
        nu = cast_like(nu, state.nu)
        mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
        return updates, SophiaState(count, mu, nu, hess_state)

    def _print_win_rate(self, updates: Updates, c: Array, count: Array) -> None:
        leaves = jax.tree.leaves(updates)
        inside = sum(jnp.sum(jnp.abs(u) < c.astype(u.dtype)) for u in leaves)
        rate = inside / sum(u.size for u in leaves)
        jax.lax.cond(
            count % self.print_win_rate_every_n_steps == 0,
            lambda: jax.debug.print("Sophia optimizer win rate: {}", rate),
            lambda: None,
        )


def scale_by_sophia(
    b1: float = 0.965,
    b2: float = 0.99,
    eps: float = 1e-8,
    gamma: float = 0.01,
    clip_threshold: float | None = 1.0,
    update_interval: int = 10,
    hessian_diagonal_fn: Any = None,
    mu_dtype: Any = None,
    verbose: bool = False,
    print_win_rate_every_n_steps: int = 0,
    *,
    nu_dtype: DTypeLike | None = None,
) -> ScaleBySophia:
    """Sophia's scaling (see :func:`~shardopt.sophia`); the Hessian estimator
    defaults to :func:`hutchinson_estimator_diag_hessian`.

    ``mu_dtype`` stores the momentum as optax does; ``nu_dtype`` stores the
    Hessian's moving average, updated and used in float32 and rounded once.
    """
    hessian = (
        hutchinson_estimator_diag_hessian()
        if hessian_diagonal_fn is None
        else hessian_diagonal_fn
    )
    return ScaleBySophia(
        b1,
        b2,
        eps,
        gamma,
        clip_threshold,
        check_int(update_interval, "update_interval", 1),
        as_transform(hessian, "sophia's hessian_diagonal_fn"),
        canonical_dtype(mu_dtype, "mu_dtype"),
        check_bool(verbose, "verbose"),
        check_int(print_win_rate_every_n_steps, "print_win_rate_every_n_steps", 0),
        canonical_dtype(nu_dtype, "nu_dtype"),
    )
