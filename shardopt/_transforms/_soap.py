"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner, matrix by matrix.

As for Shampoo, each matrix's work runs in one :func:`per_matrix` call: under
a plan each device holds whole matrices, its share of them. Communication
per step, on ``D`` devices, for a stack of ``n`` partitioned ``m x k``
float32 matrices: all-to-alls in for the gradient, both moments, both
factors and both eigenbases, and out for the update, both moments, both
factors and both eigenbases: ``(6 m k + 4 m^2 + 4 k^2) 4 (D - 1) / D``
bytes per slot of ``ceil(n / D)`` (docs/matrix.md measures it).
"""

from __future__ import annotations

from typing import ClassVar

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
    bias_correction,
    canonical_dtype,
    cast_like,
    ema,
    widened,
    zeros_like,
)
from ._matrix_layout import Item, current_matrix_layout, per_matrix
from ._shampoo import (
    LEFT,
    RIGHT,
    check_matrices,
    factor_update,
    factor_zeros,
    t_dot,
)


class SoapState(eqx.Module):
    """SOAP's state: the count, Adam's moments (the first in the parameters'
    basis, the second in the eigenbasis), Shampoo's factors and their
    eigenbases."""

    factored_dims: ClassVar = {
        "left": lambda ndim: LEFT,
        "right": lambda ndim: RIGHT,
        "q_left": lambda ndim: LEFT,
        "q_right": lambda ndim: RIGHT,
    }

    count: Array
    mu: Updates
    nu: Updates
    left: Updates
    right: Updates
    q_left: Updates
    q_right: Updates


class ScaleBySoap(AbstractTransform):
    """SOAP's direction: Adam run in the eigenbasis ``Q_L, Q_R`` of Shampoo's
    factors.

    ``L, R`` are Shampoo's factors (moving averages of ``G G^T``, ``G^T G``
    with ``shampoo_beta``); every ``precondition_frequency`` steps (the first
    included) ``Q_L, Q_R`` become their eigenvectors (``eigh``; the paper
    refreshes them by a power iteration and QR, Algorithm 4). With
    ``G' = Q_L^T G Q_R``: ``M = b1 M + (1 - b1) G``, ``V = b2 V + (1 - b2)
    G'^2``, ``N' = M'_hat / (sqrt(V_hat) + eps)`` with ``M' = Q_L^T M Q_R``
    and Adam's bias corrections, and the update ``Q_L N' Q_R^T``. Vyas et
    al., "SOAP: Improving and Stabilizing Shampoo using Adam", ICLR 2025.

    ``M`` and ``V`` are stored in float32, or in ``mu_dtype`` / ``nu_dtype``
    (updated and used in float32, rounded once when stored); the factors and
    eigenbases stay in float32.
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    shampoo_beta: Hyperparameter = hyperparameter("shampoo_beta", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    precondition_frequency: int = eqx.field(static=True)
    mu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> SoapState:
        check_matrices("soap", params)
        eye = lambda rows: jax.tree.map(
            lambda x: jnp.eye(x.shape[0] if rows else x.shape[1], dtype=jnp.float32),
            params,
        )
        return SoapState(
            zero_count(),
            zeros_like(params, self.mu_dtype or jnp.float32),
            zeros_like(params, self.nu_dtype or jnp.float32),
            factor_zeros(params, True),
            factor_zeros(params, False),
            eye(True),
            eye(False),
        )

    def update(
        self, grads: Updates, state: SoapState, params: Params | None = None
    ) -> tuple[Updates, SoapState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        sb = resolve(self.shampoo_beta, state.count, name="shampoo_beta")
        eps = resolve(self.eps, state.count, name="eps")
        leaves = check_matrices("soap", grads)
        g32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        count = safe_increment(state.count)
        refresh = state.count % self.precondition_frequency == 0

        # every state update inside: each matrix's numbers then come from one
        # device's kernels whatever the layout, and the eigenbases of nearly
        # degenerate factors (which ulps may turn) are the unsharded run's
        def one(g, m, v, left, right, ql, qr):
            m = ema(g, m, b1, 1)
            left, right = factor_update(g, left, right, sb)
            ql, qr = jax.lax.cond(
                refresh,
                lambda: (jnp.linalg.eigh(left)[1], jnp.linalg.eigh(right)[1]),
                lambda: (ql, qr),
            )
            rotate = lambda x: t_dot(ql, x) @ qr
            v = ema(rotate(g), v, b2, 2)
            m_hat = bias_correction(rotate(m), b1, count)
            v_hat = bias_correction(v, b2, count)
            n = m_hat / (jnp.sqrt(v_hat) + eps)
            return ql @ n @ qr.T, m, v, left, right, ql, qr

        layout = current_matrix_layout()
        mu, nu = widened(state.mu, self.mu_dtype), widened(state.nu, self.nu_dtype)
        ins = [mu, nu, state.left, state.right, state.q_left]
        flat = [jax.tree.leaves(t) for t in (g32, *ins, state.q_right)]
        items = []
        for (path, x), *arrays in zip(leaves, *flat, strict=True):
            m, k = x.shape
            spec = lspec = rspec = None
            if layout is not None:
                spec = layout.spec(path, (m, k))
                lspec = layout.spec(path, (m, m), LEFT)
                rspec = layout.spec(path, (k, k), RIGHT)
            out_specs = (spec, spec, spec, lspec, rspec, lspec, rspec)
            items.append(Item(arrays, out_specs, out_specs))
        results = per_matrix(one, items)
        treedef = jax.tree.structure(grads)
        unflat = lambda i: jax.tree.unflatten(treedef, [r[i] for r in results])
        updates = jax.tree.map(lambda u, g: u.astype(g.dtype), unflat(0), grads)
        mu, nu = cast_like(unflat(1), state.mu), cast_like(unflat(2), state.nu)
        new = SoapState(count, mu, nu, *(unflat(i) for i in range(3, 7)))
        return updates, new


def scale_by_soap(
    b1: ScalarOrSchedule = 0.95,
    b2: ScalarOrSchedule = 0.95,
    shampoo_beta: ScalarOrSchedule | None = None,
    eps: ScalarOrSchedule = 1e-8,
    precondition_frequency: int = 10,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> ScaleBySoap:
    """Rescale matrix updates as SOAP does: Adam in Shampoo's eigenbasis.

    ``shampoo_beta`` defaults to ``b2``, as in the paper's code. Vyas et al.,
    "SOAP: Improving and Stabilizing Shampoo using Adam", ICLR 2025.
    ``mu_dtype`` / ``nu_dtype`` store Adam's moments (default float32).
    """
    if int(precondition_frequency) < 1:
        raise ValueError(
            f"precondition_frequency must be >= 1, got {precondition_frequency!r}"
        )
    return ScaleBySoap(
        b1,
        b2,
        b2 if shampoo_beta is None else shampoo_beta,
        eps,
        int(precondition_frequency),
        canonical_dtype(mu_dtype, "mu_dtype"),
        canonical_dtype(nu_dtype, "nu_dtype"),
    )
