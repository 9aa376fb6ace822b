"""L-BFGS: the updates multiplied by a limited-memory inverse-Hessian estimate."""

from __future__ import annotations

import operator
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._explicit import explicit_sharding, match_sharding
from .._tree_math import promote
from ._linesearch import (
    at_least_f32,
    axpy,
    require,
    scale_tree,
    tree_vdot,
    value_dtype,
)


def _history_dims(ndim: int) -> tuple[int | None, ...]:
    """A history leaf's dims: its own leading memory dim, then the parameter's."""
    return (None, *range(ndim))


class ScaleByLBFGSState(eqx.Module):
    """The last parameters and updates, and ``memory_size`` past differences.

    ``diff_params_memory`` and ``diff_updates_memory`` hold, for each
    parameter, a leading memory dim of ``memory_size`` rows shaped like it:
    row ``k % memory_size`` is ``w_{k+1} - w_k`` (resp. ``u_{k+1} - u_k``);
    ``weights_memory[k % memory_size]`` is ``1 / <du_k, dw_k>`` (0 when that
    is 0). ``params`` and ``updates`` mirror the parameters.

    ``factored_dims`` declares the history's dims for the ZeRO plan, in the
    form of :class:`shardopt.sharding.FactoredState` (``None``: the memory
    dim, which is no parameter's). The plan does not read it yet, so the
    history is replicated for now.
    """

    factored_dims: ClassVar = {
        "diff_params_memory": _history_dims,
        "diff_updates_memory": _history_dims,
    }
    count: Array
    params: Params
    updates: Updates
    diff_params_memory: Updates
    diff_updates_memory: Updates
    weights_memory: Array


def _sum_of_squares(tree: Updates) -> Array:
    """``sum_i sum(|leaf_i|**2)``, added leaf by leaf in order, at least float32."""
    total = None
    for leaf in jax.tree.leaves(tree):
        x = leaf.astype(at_least_f32(leaf.dtype))
        part = jnp.sum(jnp.square(x.real) + jnp.square(x.imag))
        total = part if total is None else jnp.add(*promote(total, part))
    return jnp.zeros([], jnp.float32) if total is None else total


def _row(memory: Updates, i: Array, like: Updates) -> Updates:
    """Row ``i`` of every memory leaf, laid out like the leaf of ``like``."""

    def read(m, x):
        target = explicit_sharding(x)
        if target is None:
            return m[i]
        return m.at[i].get(out_sharding=target)

    return jax.tree.map(read, memory, like)


def _two_loop(
    updates: Updates,
    dw: Updates,
    du: Updates,
    rho: Array,
    gamma: Array,
    newest: Array,
) -> Updates:
    """``P u`` by the two-loop recursion (Nocedal & Wright, Algorithm 7.4).

    The rows are visited from the newest back to the oldest (``alpha_j``), the
    vector is scaled by ``gamma`` (the initial ``P = gamma I``), then the rows
    are visited again from the oldest (``beta_j``). Empty rows (``rho = 0``)
    change nothing.
    """
    m = rho.shape[0]
    order = (newest + jnp.arange(m)) % m

    def backward(q, i):
        alpha = rho[i] * tree_vdot(_row(dw, i, q), q).astype(rho.dtype)
        return axpy(q, -alpha, _row(du, i, q)), alpha

    q, alphas = jax.lax.scan(backward, updates, order, reverse=True)
    r = scale_tree(gamma, q)

    def forward(r, step):
        i, alpha = step
        beta = rho[i] * tree_vdot(_row(du, i, r), r).astype(rho.dtype)
        return axpy(r, alpha - beta, _row(dw, i, r)), beta

    r, _ = jax.lax.scan(forward, r, (order, alphas))
    return r


def _memory_size(value: Any) -> int:
    """``memory_size`` as a Python int (it fixes the state's shapes), at least 1."""
    try:
        size = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        size = None
    if size is None:
        raise ValueError(f"memory_size must be an integer, got {value!r}")
    if size < 1:
        raise ValueError(f"memory_size must be >= 1, got {size!r}")
    return size


class ScaleByLBFGS(AbstractTransform):
    r"""Multiply the updates by the L-BFGS estimate ``P_k`` of the inverse Hessian.

    With ``dw_j = w_{j+1} - w_j``, ``du_j = u_{j+1} - u_j`` and
    ``rho_j = 1 / <du_j, dw_j>`` over the last ``memory_size`` steps,
    ``P_k = V_{k-1}^T P_{k-1} V_{k-1} + rho_{k-1} dw_{k-1} dw_{k-1}^T`` with
    ``V_j = I - rho_j du_j dw_j^T``, from ``P = gamma_k I``:
    ``gamma_k = <dw_{k-1}, du_{k-1}> / <du_{k-1}, du_{k-1}>`` when
    ``scale_init_precond`` (and ``min(1, 1 / ||u_0||)`` at the first step,
    so the first step has length at most 1), else 1. The memory is updated
    from the parameters and updates of this call before they are
    preconditioned, so a line search chained after it sees ``P_k u_k`` and
    the memory only records accepted steps. The output is the direction
    ``P_k u_k`` itself: chain a negative scale or a line search after it.

    Nocedal, "Updating quasi-Newton matrices with limited storage",
    Mathematics of Computation 1980; Liu & Nocedal, "On the limited memory
    BFGS method for large scale optimization", Mathematical Programming 1989.
    """

    memory_size: int = eqx.field(static=True, converter=_memory_size)
    scale_init_precond: bool = eqx.field(static=True, converter=bool)

    def init(self, params: Params) -> ScaleByLBFGSState:
        m = self.memory_size
        zeros = lambda x: jnp.zeros(x.shape, x.dtype)
        memory = lambda x: jnp.zeros((m, *x.shape), x.dtype)
        return ScaleByLBFGSState(
            count=zero_count(),
            params=jax.tree.map(zeros, params),
            updates=jax.tree.map(zeros, params),
            diff_params_memory=jax.tree.map(memory, params),
            diff_updates_memory=jax.tree.map(memory, params),
            weights_memory=jnp.zeros((m,), value_dtype(params)),
        )

    def update(
        self, grads: Updates, state: ScaleByLBFGSState, params: Params | None = None
    ) -> tuple[Updates, ScaleByLBFGSState]:
        require("scale_by_lbfgs", params=params)
        m = self.memory_size
        count = state.count
        started = count > 0
        newest = count % m
        previous = (count - 1) % m
        rho_dtype = state.weights_memory.dtype

        # 1. Record the step just taken (nothing at the first call).
        sub = lambda a, b: (a - b.astype(a.dtype)).astype(b.dtype)
        dw = jax.tree.map(sub, params, state.params)
        du = jax.tree.map(sub, grads, state.updates)
        curvature = tree_vdot(du, dw).astype(rho_dtype)
        rho = jnp.where(curvature == 0, jnp.zeros_like(curvature), 1 / curvature)
        dw, du, rho = jax.tree.map(
            lambda x: jnp.where(started, x, jnp.zeros_like(x)), (dw, du, rho)
        )

        def store(memory, row):
            row = match_sharding(row, memory, drop_leading=True)
            target = explicit_sharding(memory)
            if target is None:
                return memory.at[previous].set(row)
            return memory.at[previous].set(row, out_sharding=target)

        dw_memory = jax.tree.map(store, state.diff_params_memory, dw)
        du_memory = jax.tree.map(store, state.diff_updates_memory, du)
        rho_memory = state.weights_memory.at[previous].set(rho)

        # 2. The initial estimate gamma * I.
        if self.scale_init_precond:
            num = tree_vdot(du, dw).astype(rho_dtype)
            den = _sum_of_squares(du).astype(rho_dtype)
            one = jnp.ones([], rho_dtype)
            gamma = jnp.where(den > 0, num / den, one)
            norm = jnp.sqrt(_sum_of_squares(jax.lax.stop_gradient(grads)))
            first = jnp.minimum(one, 1 / norm.astype(rho_dtype))
            gamma = jnp.where(started, gamma, first)
        else:
            gamma = jnp.ones([], rho_dtype)

        # 3. The direction P_k u_k.
        direction = _two_loop(grads, dw_memory, du_memory, rho_memory, gamma, newest)
        new_state = ScaleByLBFGSState(
            count=safe_increment(count),
            params=jax.tree.map(lambda p, s: p.astype(s.dtype), params, state.params),
            updates=jax.tree.map(lambda g, s: g.astype(s.dtype), grads, state.updates),
            diff_params_memory=dw_memory,
            diff_updates_memory=du_memory,
            weights_memory=rho_memory,
        )
        return direction, new_state


def scale_by_lbfgs(
    memory_size: int = 10, scale_init_precond: bool = True
) -> ScaleByLBFGS:
    """Precondition the updates by L-BFGS's inverse-Hessian estimate.

    Keeps ``memory_size`` past parameter and update differences (each a
    copy of the parameters: ``2 * memory_size + 2`` copies of state in all).
    The output is ``P u`` (for gradients ``u``, minus a descent direction):
    chain ``scale(-1)`` and, best, a line search (see :func:`lbfgs`).
    """
    return ScaleByLBFGS(memory_size, scale_init_precond)
