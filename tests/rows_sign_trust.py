"""The conformance rows of sign methods, Rprop, Adadelta, gradient noise, the
trust-ratio optimizers (Fromage, LARS, LAMB), parameter-block scaling and DoG.

polyak_sgd needs the loss at every step, which the table's step does not pass:
tests/test_sign_trust.py checks it against optax instead.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from conformance import EXACT_B1, EXACT_B2, Row, weight_mask

import shardopt

ROWS = [
    Row("sign_sgd", lambda: shardopt.sign_sgd(1e-2), lambda: optax.sign_sgd(1e-2)),
    Row(
        "signum_acc_f32_exact_beta",
        lambda: shardopt.signum(1e-2, EXACT_B1, accumulator_dtype=jnp.float32),
        lambda: optax.signum(1e-2, EXACT_B1, accumulator_dtype=jnp.float32),
    ),
    Row("rprop", lambda: shardopt.rprop(1e-2), lambda: optax.rprop(1e-2)),
    Row(
        "adadelta_masked_decay_exact_rho",
        lambda: shardopt.adadelta(
            10.0, EXACT_B1, weight_decay=0.1, weight_decay_mask=weight_mask
        ),
        lambda: optax.adadelta(
            10.0, EXACT_B1, weight_decay=0.1, weight_decay_mask=weight_mask
        ),
    ),
    Row(
        "noisy_sgd",
        lambda: shardopt.noisy_sgd(1e-2, key=0),
        lambda: optax.noisy_sgd(1e-2, key=0),
    ),
    Row("fromage", lambda: shardopt.fromage(1e-2), lambda: optax.fromage(1e-2)),
    Row("lars", lambda: shardopt.lars(0.1), lambda: optax.lars(0.1)),
    Row(
        "lars_masked_nesterov",
        lambda: shardopt.lars(
            0.1,
            weight_decay=1e-2,
            weight_decay_mask=weight_mask,
            trust_coefficient=0.01,
            eps=1e-3,
            trust_ratio_mask=weight_mask,
            nesterov=True,
        ),
        lambda: optax.lars(
            0.1,
            weight_decay=1e-2,
            weight_decay_mask=weight_mask,
            trust_coefficient=0.01,
            eps=1e-3,
            trust_ratio_mask=weight_mask,
            nesterov=True,
        ),
    ),
    Row(
        "lamb_masked_exact_betas",
        lambda: shardopt.lamb(
            1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
        lambda: optax.lamb(
            1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
    ),
    Row(
        "param_block_norm_rms",
        lambda: shardopt.chain(
            shardopt.scale_by_param_block_norm(),
            shardopt.scale_by_param_block_rms(),
            shardopt.scale(-1e-2),
        ),
        lambda: optax.chain(
            optax.scale_by_param_block_norm(),
            optax.scale_by_param_block_rms(),
            optax.scale(-1e-2),
        ),
    ),
    Row(
        "distance_over_gradients",
        lambda: shardopt.scale_by_distance_over_gradients(
            reps_rel=3e-3, global_scale=-1.0
        ),
        lambda: optax.scale_by_distance_over_gradients(
            reps_rel=3e-3, global_scale=-1.0
        ),
    ),
]

# The Polyak step needs the loss (value=), which the table's step does not pass.
ELSEWHERE = {
    "polyak_sgd": "tests/test_sign_trust.py (value= through Optimizer.step)",
    "scale_by_polyak": "tests/test_sign_trust.py",
}
