"""Shampoo: a Kronecker-factored preconditioner, one left and one right factor
per matrix; each device computes the inverse roots of its share of matrices.

Every matrix's work (the statistics' update, their inverse fourth roots by
eigendecomposition, the preconditioned update) runs in one
:func:`per_matrix` call, so under a plan each device holds whole matrices,
its share of them, and nobody gathers everything. Communication per step, on
``D`` devices, for a stack of ``n`` partitioned ``m x k`` float32 matrices:
all-to-alls in for the gradient, the grafting's moment and both factors,
and out for the update, that moment and both factors, each moving
``(D - 1) / D`` of a device's ``ceil(n / D)`` slots: ``(4 m k + 2 m^2 +
2 k^2) 4 (D - 1) / D`` bytes per slot, in and out together (docs/matrix.md
measures it).
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
    POSITIVE,
    UNIT_INTERVAL,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree import describe, path_str
from .._tree_math import (
    bias_correction,
    canonical_dtype,
    cast_like,
    ema,
    widened,
    zeros_like,
)
from ._matrix_layout import Item, current_matrix_layout, per_matrix

_NOT_A_MATRIX = (
    "{name} preconditions matrices, but the update at {path} is {desc}; send "
    "non-matrix parameters to another transform (shardopt.{name} sends them to "
    "its AdamW fallback)"
)
LEFT = (0, None)  # a left factor keeps the parameter's rows (dim 0)
RIGHT = (1, None)  # a right factor keeps its columns (dim 1)


def inverse_root(stat: Array, eps: Array, power: int) -> Array:
    """``(S + eps I)^(-1/power)`` of a symmetric PSD ``S``, by ``eigh``.

    Eigenvalues are clipped at 0 first (rounding can make them negative).
    """
    vals, vecs = jnp.linalg.eigh(stat)
    vals = jnp.maximum(vals, 0) + eps
    return (vecs * vals ** (-1.0 / power)) @ vecs.T


def factor_update(g: Array, left: Array, right: Array, b2: Array):
    """The Kronecker factors' moving averages: ``L <- b2 L + (1 - b2) G G^T``,
    ``R <- b2 R + (1 - b2) G^T G``."""
    return ema_matrix(g @ g.T, left, b2), ema_matrix(t_dot(g, g), right, b2)


def t_dot(a: Array, b: Array) -> Array:
    """``a^T b`` as one dot_general: XLA:CPU rounds ``a.T @ b`` differently in
    a batch of one than in a larger batch, which would make a device holding
    one matrix of a stack disagree with the unsharded run."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())))


def ema_matrix(new: Array, old: Array, decay: Array) -> Array:
    return (1 - decay) * new + decay * old


class KroneckerFactors:
    """Mixin: a state whose ``left``/``right`` leaves keep a matrix's rows and
    columns, so the sharding plan partitions them like those dims."""

    factored_dims: ClassVar = {
        "left": lambda ndim: LEFT,
        "right": lambda ndim: RIGHT,
    }


class ShampooState(KroneckerFactors, eqx.Module):
    """Shampoo's state: the count, the momentum of the grafted direction, the
    grafting's (RMSProp's) second moment, the Kronecker factors."""

    count: Array
    mu: Updates
    nu: Updates
    left: Updates
    right: Updates


def check_matrices(name: str, tree: Updates) -> list[tuple[str, Array]]:
    """``(path, leaf)`` of every leaf, raising for one that is not 2-D."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if x.ndim != 2:
            raise ValueError(
                _NOT_A_MATRIX.format(name=name, path=path_str(path), desc=describe(x))
            )
        out.append((path_str(path), x))
    return out


def factor_zeros(tree: Updates, rows: bool) -> Updates:
    """Zero ``m x m`` (``rows``) or ``k x k`` float32 factors of ``m x k`` leaves."""
    size = lambda x: x.shape[0] if rows else x.shape[1]
    return jax.tree.map(lambda x: jnp.zeros((size(x), size(x)), jnp.float32), tree)


def specs_of(path: str, x: Array) -> tuple:
    """The stored layouts of a matrix, its left and its right factor."""
    layout = current_matrix_layout()
    if layout is None:
        return None, None, None
    m, k = x.shape
    return (
        layout.spec(path, (m, k)),
        layout.spec(path, (m, m), LEFT),
        layout.spec(path, (k, k), RIGHT),
    )


class ScaleByShampoo(AbstractTransform):
    """Shampoo's direction, grafted to RMSProp's norm, then momentum.

    ``L = b2 L + (1 - b2) G G^T``, ``R = b2 R + (1 - b2) G^T G``;
    ``P = (L + eps I)^(-1/4) G (R + eps I)^(-1/4)`` (inverse roots by
    eigendecomposition, every step), rescaled to the Frobenius norm of
    RMSProp's direction ``G / (sqrt(V_hat) + graft_eps)`` with
    ``V = b2 V + (1 - b2) G^2`` (layer-wise grafting, Agarwal et al., "Disentangling
    Adaptive Gradient Methods from Learning Rates", 2020); the update is the
    bias-corrected momentum ``M = b1 M + (1 - b1) P``. Gupta, Koren & Singer,
    "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018;
    Anil et al., "Scalable Second Order Optimization for Deep Learning", 2020.

    ``M`` and ``V`` are stored in float32, or in ``mu_dtype`` / ``nu_dtype``
    (updated and used in float32, rounded once when stored); the factors stay
    in float32, which their inverse roots need.
    """

    b1: Hyperparameter = hyperparameter("b1", UNIT_INTERVAL)
    b2: Hyperparameter = hyperparameter("b2", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", POSITIVE)
    graft_eps: Hyperparameter = hyperparameter("graft_eps", POSITIVE)
    mu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ShampooState:
        check_matrices("shampoo", params)
        return ShampooState(
            zero_count(),
            zeros_like(params, self.mu_dtype or jnp.float32),
            zeros_like(params, self.nu_dtype or jnp.float32),
            factor_zeros(params, True),
            factor_zeros(params, False),
        )

    def update(
        self, grads: Updates, state: ShampooState, params: Params | None = None
    ) -> tuple[Updates, ShampooState]:
        del params
        b1 = resolve(self.b1, state.count, name="b1")
        b2 = resolve(self.b2, state.count, name="b2")
        eps = resolve(self.eps, state.count, name="eps")
        graft_eps = resolve(self.graft_eps, state.count, name="graft_eps")
        leaves = check_matrices("shampoo", grads)
        count = safe_increment(state.count)
        g32 = jax.tree.map(lambda g: g.astype(jnp.float32), grads)

        # the grafting's moment is updated inside too: each matrix's numbers
        # then come from one device's kernels whatever the layout
        def one(g, v, left, right):
            v = ema(g, v, b2, 2)
            d = g / (jnp.sqrt(bias_correction(v, b2, count)) + graft_eps)
            left, right = factor_update(g, left, right, b2)
            p = inverse_root(left, eps, 4) @ g @ inverse_root(right, eps, 4)
            norm_p, norm_d = jnp.linalg.norm(p), jnp.linalg.norm(d)
            safe = jnp.where(norm_p > 0, norm_p, 1)
            return p * jnp.where(norm_p > 0, norm_d / safe, 0), v, left, right

        nu = widened(state.nu, self.nu_dtype)
        flat = [jax.tree.leaves(t) for t in (g32, nu, state.left, state.right)]
        items = []
        for (path, x), *ins in zip(leaves, *flat, strict=True):
            spec, lspec, rspec = specs_of(path, x)
            specs = (spec, spec, lspec, rspec)
            items.append(Item(ins, specs, specs))
        results = per_matrix(one, items)
        treedef = jax.tree.structure(grads)
        unflat = lambda i: jax.tree.unflatten(treedef, [r[i] for r in results])
        mu = widened(state.mu, self.mu_dtype)
        mu = jax.tree.map(lambda p, m: ema(p, m, b1, 1), unflat(0), mu)
        updates = jax.tree.map(
            lambda m, g: bias_correction(m, b1, count).astype(g.dtype), mu, grads
        )
        mu, nu = cast_like(mu, state.mu), cast_like(unflat(1), state.nu)
        new = ShampooState(count, mu, nu, unflat(2), unflat(3))
        return updates, new


def scale_by_shampoo(
    b1: ScalarOrSchedule = 0.9,
    b2: ScalarOrSchedule = 0.999,
    eps: ScalarOrSchedule = 1e-6,
    graft_eps: ScalarOrSchedule = 1e-8,
    *,
    mu_dtype: DTypeLike | None = None,
    nu_dtype: DTypeLike | None = None,
) -> ScaleByShampoo:
    """Rescale matrix updates by Shampoo's Kronecker-factored preconditioner.

    Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor
    Optimization", ICML 2018. See :class:`ScaleByShampoo`; ``mu_dtype`` /
    ``nu_dtype`` store the momentum and the grafting's second moment
    (default float32).
    """
    return ScaleByShampoo(
        b1,
        b2,
        eps,
        graft_eps,
        canonical_dtype(mu_dtype, "mu_dtype"),
        canonical_dtype(nu_dtype, "nu_dtype"),
    )
