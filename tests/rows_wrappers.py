"""Wrapper transforms that keep state across steps, each around a cheap inner one.

The table's gradients are always finite, so these rows check the wrappers'
numbers and state on ordinary steps; skipped steps (NaNs, masks), the inner
state left bit for bit, monitored values and lookahead are in test_wrappers.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from conformance import EXACT_B1, EXACT_B2, Row

import shardopt
from shardopt._tree_math import global_norm


def not_every_third(step):
    """Run on steps 1, 2, 4, 5, ...; skip 0, 3, 6, ... (same function for both)."""
    return step % 3 != 0


def norm(updates):
    return global_norm(updates)


def _adam(lib):
    return lib.adam(1e-2, EXACT_B1, EXACT_B2)


def _monitored(lib):
    return lib.chain(
        lib.trace(0.5),
        lib.snapshot("norm", norm),
        lib.monitor({"norm": norm, "norm_ema": lib.measure_with_ema(norm, EXACT_B1)}),
        lib.scale(-3e-2),
    )


ROWS = [
    Row(
        "apply_if_finite_adam_exact_betas",
        lambda: shardopt.apply_if_finite(_adam(shardopt), 3),
        lambda: optax.apply_if_finite(_adam(optax), 3),
    ),
    Row(
        "apply_if_finite_optax_inner",
        lambda: shardopt.apply_if_finite(_adam(optax), 3),
        lambda: optax.apply_if_finite(_adam(optax), 3),
    ),
    Row(
        # sgd with momentum, so that some state is partitioned under ZeRO
        "zero_nans_sgd_momentum",
        lambda: shardopt.chain(shardopt.zero_nans(), shardopt.sgd(3e-2, 0.9)),
        lambda: optax.chain(optax.zero_nans(), optax.sgd(3e-2, 0.9)),
    ),
    Row(
        "conditionally_mask_adam_exact_betas",
        lambda: shardopt.conditionally_mask(_adam(shardopt), not_every_third),
        lambda: optax.conditionally_mask(_adam(optax), not_every_third),
    ),
    Row(
        # skipped steps pass the raw gradient on to the scale: a plain sgd step
        "conditionally_transform_trace",
        lambda: shardopt.chain(
            shardopt.conditionally_transform(shardopt.trace(0.5), not_every_third),
            shardopt.scale(-3e-2),
        ),
        lambda: optax.chain(
            optax.conditionally_transform(optax.trace(0.5), not_every_third),
            optax.scale(-3e-2),
        ),
    ),
    Row(
        "apply_every_3_trace",
        lambda: shardopt.chain(
            shardopt.trace(0.5), shardopt.apply_every(3), shardopt.scale(-3e-2)
        ),
        lambda: optax.chain(optax.trace(0.5), optax.apply_every(3), optax.scale(-3e-2)),
    ),
    Row(
        "ema_debiased",
        lambda: shardopt.chain(shardopt.ema(EXACT_B1), shardopt.scale(-3e-2)),
        lambda: optax.chain(optax.ema(EXACT_B1), optax.scale(-3e-2)),
    ),
    Row(
        "ema_f32_accumulator_not_debiased",
        lambda: shardopt.chain(
            shardopt.ema(EXACT_B1, debias=False, accumulator_dtype=jnp.float32),
            shardopt.scale(-3e-2),
        ),
        lambda: optax.chain(
            optax.ema(EXACT_B1, debias=False, accumulator_dtype=jnp.float32),
            optax.scale(-3e-2),
        ),
    ),
    Row(
        "snapshot_monitor_measure_with_ema",
        lambda: _monitored(shardopt),
        lambda: _monitored(optax),
    ),
]

# lookahead steps a (fast, slow) pair, and the others are functions for
# MultiSteps or for a target network: tests/test_wrappers.py runs them.
ELSEWHERE = {
    "lookahead": "tests/test_wrappers.py (fast and slow parameters)",
    "periodic_update": "tests/test_wrappers.py",
    "skip_large_updates": "tests/test_wrappers.py",
    "skip_not_finite": "tests/test_wrappers.py",
}
