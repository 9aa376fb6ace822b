"""Mechanic: a learned scale for the updates of any base optimizer.

The state keeps the first parameters ``x0`` (laid out like the parameters by
the ZeRO plan, as a mirror) and a handful of scalars per candidate beta
(replicated: ``num_betas`` numbers each).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

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
    Hyperparameter,
    hyperparameter,
    resolve,
)
from .._interop import as_transform
from .._tree_math import copied, global_norm, lowest_dtype, promote, vdot
from ._conditional import check_int


class MechanicState(eqx.Module):
    """State of :func:`mechanize`, with optax's field names.

    ``r``, ``m``, ``v``, ``s`` hold one number per beta, in the parameters'
    lowest dtype; ``x0`` the parameters of the first step.
    """

    base_optimizer_state: State
    count: Array
    r: Array
    m: Array
    v: Array
    s: Array
    x0: Params


def _sub(a: Array, b: Array) -> Array:
    a, b = promote(a, b)
    return a - b


class Mechanize(AbstractTransform):
    r"""Mechanic around ``base_optimizer``: learns the scale ``\sum_i s_i``.

    With ``\Delta_t = (x_0 - x_t) / (\sum s + eps) - u_t`` (``u_t`` the base
    update), ``h = <g + \lambda \sum s \|g\| / (\|x\| + eps) x, \Delta_{t-1}>``
    and for each ``\beta_i = 1 - 10^{-i}``:
    ``m_i = \max(\beta_i m_i, |h| + eps)``, ``v_i = \beta_i^2 v_i + h^2``,
    ``r_i = \beta_i r_i + clip(h, \pm m_i^{old}) s_i``,
    ``s_i = (s_{init}/n \, m_i + \max(0, r_i)) / (\sqrt{v_i} + eps)``; then
    ``x_{t+1} = x_0 - \sum_i s_i \Delta_t``.

    Cutkosky, Defazio & Mehta, "Mechanic: A Learning Rate Tuner", NeurIPS 2023.
    """

    base_optimizer: AbstractTransform
    weight_decay: Hyperparameter = hyperparameter("weight_decay", NONNEGATIVE)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)
    s_init: Hyperparameter = hyperparameter("s_init", POSITIVE)
    num_betas: int = eqx.field(static=True)
    takes_extra_args = True

    def init(self, params: Params) -> MechanicState:
        dtype = lowest_dtype(params)
        zeros = lambda: jnp.zeros([self.num_betas], dtype)  # a buffer each
        s_init = resolve(self.s_init, zero_count(), name="s_init")
        return MechanicState(
            base_optimizer_state=self.base_optimizer.init(params),
            count=zero_count(),
            r=zeros(),
            m=zeros(),
            v=zeros(),
            s=jnp.full([self.num_betas], s_init.astype(dtype)),
            x0=copied(params),
        )

    def update(
        self,
        grads: Updates,
        state: MechanicState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, MechanicState]:
        if params is None:
            raise ValueError("mechanize needs the parameters: update(g, s, params)")
        base_updates, base_state = update_with_extra_args(
            self.base_optimizer, grads, state.base_optimizer_state, params, extra_args
        )
        # the first step's parameters, not init's: a loop may load weights later
        x0 = jax.lax.cond(state.count == 0, lambda: params, lambda: state.x0)
        dtype = state.s.dtype
        cast = lambda value: jnp.asarray(value).astype(dtype)
        eps = resolve(self.eps, state.count, name="eps")
        s_init = resolve(self.s_init, state.count, name="s_init")
        weight_decay = resolve(self.weight_decay, state.count, name="weight_decay")
        s_sum = jnp.sum(state.s)
        # decay the raw gradients (apart from any decay in the base optimizer)
        factor = cast(weight_decay) * s_sum
        factor, grad_norm = promote(factor, global_norm(grads))
        factor = factor * grad_norm
        param_norm = global_norm(params)
        factor, denominator = promote(factor, param_norm + eps.astype(param_norm.dtype))
        factor = factor / denominator

        def decayed(g, p):
            f, p = promote(factor, p)
            g, fp = promote(g, f * p)
            return g + fp

        decayed_grads = jax.tree.map(decayed, grads, params)

        def previous_delta(x, x_first):
            # the divisor built per leaf, as optax writes it: XLA then compiles
            # the same arithmetic (shared, it keeps a true division; per leaf
            # it multiplies by the reciprocal)
            d, scale = promote(x_first - x, s_sum + cast(eps))
            return d / scale

        delta_prev = jax.tree.map(previous_delta, params, x0)
        delta = jax.tree.map(_sub, delta_prev, base_updates)
        # a tree of mixed dtypes gives a wider h; the state keeps its dtype
        h = vdot(decayed_grads, delta_prev).astype(dtype)
        clipped_h = jnp.clip(h, -state.m, state.m)
        exponents = np.arange(1, self.num_betas + 1, dtype=np.float64)
        betas = jnp.asarray(1.0 - 0.1**exponents, dtype)
        m = jnp.maximum(betas * state.m, jnp.abs(h) + cast(eps))
        v = betas**2 * state.v + h**2
        r = betas * state.r + clipped_h * state.s
        wealth = cast(s_init / self.num_betas) * m + jnp.maximum(0.0, r)
        s = wealth / (jnp.sqrt(v) + cast(eps))

        def new_update(x_first, d, p):
            d, st = promote(d, jnp.sum(s))
            new = _sub(x_first, st * d)
            return _sub(new, p)

        updates = jax.tree.map(new_update, x0, delta, params)
        new_state = MechanicState(
            base_optimizer_state=base_state,
            count=safe_increment(state.count),
            r=r,
            m=m,
            v=v,
            s=s,
            x0=x0,
        )
        return updates, new_state


def mechanize(
    base_optimizer: Any,
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    s_init: float = 1e-6,
    num_betas: int = 6,
) -> Mechanize:
    """Mechanic: learn the step size of ``base_optimizer`` (shardopt or optax).

    Give the base optimizer a learning rate (or schedule) of about 1: Mechanic
    learns the scale on top. ``weight_decay`` decays the gradients Mechanic
    sees (not the base optimizer's), ``s_init`` is the initial scale and
    ``num_betas`` the number of candidate betas ``1 - 10**-i``. Cutkosky,
    Defazio & Mehta, "Mechanic: A Learning Rate Tuner", NeurIPS 2023.
    """
    return Mechanize(
        as_transform(base_optimizer, "mechanize's base_optimizer"),
        weight_decay,
        eps,
        s_init,
        check_int(num_betas, "num_betas", 1),
    )
