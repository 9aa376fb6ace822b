"""Resilient backpropagation: per-element step sizes driven by gradient signs."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._hyperparams import (
    NONNEGATIVE,
    Domain,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import full_like, zeros_like

# Rprop shrinks a step when the gradient flips sign and grows it when the sign
# holds: 0 < eta_minus <= 1 <= eta_plus (equality gives a fixed step).
SHRINK = Domain(low=0.0, high=1.0, low_open=True, text="in (0, 1]")
GROW = Domain(low=1.0, text=">= 1")


def _concrete(value: object) -> bool:
    """True for a hyperparameter whose value is known now (not a schedule or tracer)."""
    return isinstance(value, jax.Array | np.ndarray) and not isinstance(
        value, jax.core.Tracer
    )


class ScaleByRpropState(eqx.Module):
    count: Array
    step_sizes: Updates
    prev_updates: Updates


class ScaleByRprop(AbstractTransform):
    """Rprop's rescaling: a step size per element, adapted by the gradient's sign.

    With ``s = g * step_prev``: the step size ``eta`` becomes
    ``clip(eta * eta_plus, min, max)`` where ``s > 0``, ``clip(eta * eta_minus,
    min, max)`` where ``s < 0`` and stays where ``s = 0``. The new step is
    ``eta * sign(g)``, or 0 where the sign flipped (Rprop without
    weight-backtracking). As in optax 0.2.8, the update emitted is the step
    chosen at the previous call (0 at the first), zeroed where the sign has
    just flipped; descent needs a ``scale(-1)`` after it.

    Riedmiller & Braun, "A Direct Adaptive Method for Faster Backpropagation
    Learning: The RPROP Algorithm", IEEE ICNN 1993; Igel & Huesken, "Empirical
    evaluation of the improved Rprop learning algorithms", Neurocomputing 2003.
    """

    learning_rate: Hyperparameter = hyperparameter("learning_rate", NONNEGATIVE)
    eta_minus: Hyperparameter = hyperparameter("eta_minus", SHRINK)
    eta_plus: Hyperparameter = hyperparameter("eta_plus", GROW)
    min_step_size: Hyperparameter = hyperparameter("min_step_size", NONNEGATIVE)
    max_step_size: Hyperparameter = hyperparameter("max_step_size", NONNEGATIVE)

    def __check_init__(self):
        low, high = self.min_step_size, self.max_step_size
        if _concrete(low) and _concrete(high) and float(low) > float(high):
            raise ValueError(
                "min_step_size must be <= max_step_size, got "
                f"min_step_size={float(low)!r} and max_step_size={float(high)!r}"
            )

    def init(self, params: Params) -> ScaleByRpropState:
        initial = resolve(self.learning_rate, zero_count(), name="learning_rate")
        return ScaleByRpropState(
            zero_count(), full_like(params, initial), zeros_like(params)
        )

    def update(
        self, grads: Updates, state: ScaleByRpropState, params: Params | None = None
    ) -> tuple[Updates, ScaleByRpropState]:
        del params
        count = state.count
        eta_minus = resolve(self.eta_minus, count, name="eta_minus")
        eta_plus = resolve(self.eta_plus, count, name="eta_plus")
        low = resolve(self.min_step_size, count, name="min_step_size")
        high = resolve(self.max_step_size, count, name="max_step_size")
        agreement = jax.tree.map(lambda g, p: g * p, grads, state.prev_updates)

        def new_step_size(s, eta):
            factor = jnp.where(s > 0, eta_plus, eta_minus).astype(eta.dtype)
            grown = jnp.clip(
                eta * factor, low.astype(eta.dtype), high.astype(eta.dtype)
            )
            return jnp.where(s == 0, eta, grown)

        step_sizes = jax.tree.map(new_step_size, agreement, state.step_sizes)
        steps = jax.tree.map(
            lambda s, g, eta: jnp.where(s < 0, jnp.zeros_like(g), eta * jnp.sign(g)),
            agreement,
            grads,
            step_sizes,
        )
        updates = jax.tree.map(
            lambda s, p: jnp.where(s < 0, jnp.zeros_like(p), p),
            agreement,
            state.prev_updates,
        )
        new_state = ScaleByRpropState(safe_increment(count), step_sizes, steps)
        return updates, new_state


def scale_by_rprop(
    learning_rate: ScalarOrSchedule,
    eta_minus: ScalarOrSchedule = 0.5,
    eta_plus: ScalarOrSchedule = 1.2,
    min_step_size: ScalarOrSchedule = 1e-6,
    max_step_size: ScalarOrSchedule = 50.0,
) -> ScaleByRprop:
    """Rescale updates by Rprop's sign-adapted step sizes, starting at learning_rate."""
    return ScaleByRprop(
        learning_rate, eta_minus, eta_plus, min_step_size, max_step_size
    )
