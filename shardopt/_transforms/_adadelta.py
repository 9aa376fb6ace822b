"""Adadelta: step sizes from moving averages of squared gradients and updates."""

from __future__ import annotations

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
from .._tree_math import canonical_dtype, cast_like, ema, promote, widened, zeros_like


class ScaleByAdadeltaState(eqx.Module):
    count: Array
    e_g: Updates  # moving average of squared gradients
    e_x: Updates  # moving average of squared updates


class ScaleByAdadelta(AbstractTransform):
    """Adadelta's rescaling: the RMS of past updates over the RMS of gradients.

    ``E[g^2] = rho E[g^2] + (1 - rho) g^2``;
    ``u = sqrt(E[u^2] + eps) / sqrt(E[g^2] + eps) * g`` (with the previous
    ``E[u^2]``); then ``E[u^2] = rho E[u^2] + (1 - rho) u^2``.

    Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701, 2012.

    ``nu_dtype`` stores both averages of squares: they are updated (and the
    update computed) in float32 and rounded once when stored.
    """

    rho: Hyperparameter = hyperparameter("rho", UNIT_INTERVAL)
    eps: Hyperparameter = hyperparameter("eps", POSITIVE)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def init(self, params: Params) -> ScaleByAdadeltaState:
        return ScaleByAdadeltaState(
            zero_count(),
            zeros_like(params, self.nu_dtype),
            zeros_like(params, self.nu_dtype),
        )

    def update(
        self, grads: Updates, state: ScaleByAdadeltaState, params: Params | None = None
    ) -> tuple[Updates, ScaleByAdadeltaState]:
        del params
        rho = resolve(self.rho, state.count, name="rho")
        eps = resolve(self.eps, state.count, name="eps")
        grads_, e_x = widened(grads, self.nu_dtype), widened(state.e_x, self.nu_dtype)
        e_g = widened(state.e_g, self.nu_dtype)
        e_g = jax.tree.map(lambda g, v: ema(g, v, rho, 2), grads_, e_g)

        def rescale(g, v, x):
            ratio = jnp.sqrt(x + eps.astype(x.dtype)) / jnp.sqrt(
                v + eps.astype(v.dtype)
            )
            ratio, g = promote(ratio, g)
            return ratio * g

        updates = jax.tree.map(rescale, grads_, e_g, e_x)
        e_x = jax.tree.map(lambda u, x: ema(u, x, rho, 2), updates, e_x)
        new_state = ScaleByAdadeltaState(
            safe_increment(state.count),
            cast_like(e_g, state.e_g),
            cast_like(e_x, state.e_x),
        )
        return updates, new_state


def scale_by_adadelta(
    rho: ScalarOrSchedule = 0.9,
    eps: ScalarOrSchedule = 1e-6,
    *,
    nu_dtype: DTypeLike | None = None,
) -> ScaleByAdadelta:
    """Rescale updates as Adadelta does.

    ``nu_dtype``: the dtype both averages of squares are stored in (default:
    each parameter's); a non-floating dtype is an error.
    """
    return ScaleByAdadelta(rho, eps, canonical_dtype(nu_dtype, "nu_dtype"))
