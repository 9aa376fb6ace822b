"""Rows of the conformance table: gradient accumulation (MultiSteps)."""

import optax
from conformance import EXACT_B1, EXACT_B2, Row

import shardopt

ROWS = [
    Row(
        "multi_steps_adam_k3",
        lambda: shardopt.MultiSteps(shardopt.adam(1e-2, EXACT_B1, EXACT_B2), 3),
        lambda: optax.MultiSteps(optax.adam(1e-2, EXACT_B1, EXACT_B2), 3),
    ),
    Row(
        "multi_steps_sum_momentum_schedule",
        lambda: shardopt.MultiSteps(
            shardopt.sgd(1e-2, momentum=0.9),
            lambda step: 2 + step % 2,  # 2, 3, 2, 3, ... mini-steps
            use_grad_mean=False,
        ),
        lambda: optax.MultiSteps(
            optax.sgd(1e-2, momentum=0.9),
            lambda step: 2 + step % 2,
            use_grad_mean=False,
        ),
    ),
]
