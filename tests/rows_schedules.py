"""Rows of the conformance table: optimizers driven by the catalogue's schedules,
and inject_hyperparams."""

import optax
from conformance import EXACT_B1, EXACT_B2, Row

import shardopt

# two cycles and a tail within the 50 steps: warmup, cosine, a restart, the end
SGDR_CYCLES = [
    dict(
        init_value=0.0, peak_value=3e-2, warmup_steps=5, decay_steps=20, end_value=1e-3
    ),
    dict(init_value=1e-3, peak_value=1e-2, warmup_steps=0, decay_steps=25),
]

ROWS = [
    Row(
        "sgd_momentum_sgdr",
        lambda: shardopt.sgd(shardopt.sgdr_schedule(SGDR_CYCLES), momentum=0.9),
        lambda: optax.sgd(optax.sgdr_schedule(SGDR_CYCLES), momentum=0.9),
    ),
    Row(
        "adam_exact_betas_cosine_onecycle",
        lambda: shardopt.adam(
            shardopt.cosine_onecycle_schedule(40, 1e-2), EXACT_B1, EXACT_B2
        ),
        lambda: optax.adam(
            optax.cosine_onecycle_schedule(40, 1e-2), EXACT_B1, EXACT_B2
        ),
    ),
    # The oracle is optax.adam, not optax.inject_hyperparams(optax.adam): optax's
    # injected hyperparameters are strongly typed float32 arrays, which promote
    # the bfloat16 leaf's first moment and update to float32, while shardopt
    # keeps that leaf bfloat16. On float32 leaves the two optax forms agree (and
    # tests/test_inject.py compares with optax's inject_hyperparams there).
    Row(
        "inject_hyperparams_adam_linear_onecycle",
        lambda: shardopt.inject_hyperparams(shardopt.adam)(
            shardopt.linear_onecycle_schedule(40, 1e-2), EXACT_B1, EXACT_B2
        ),
        lambda: optax.adam(
            optax.linear_onecycle_schedule(40, 1e-2), EXACT_B1, EXACT_B2
        ),
    ),
]

# entries the table cannot drive, and where they are tested instead
ELSEWHERE = {
    "piecewise_interpolate_schedule": "tests/test_schedules_catalogue.py",
    "warmup_constant_schedule": "tests/test_schedules_catalogue.py",
    "warmup_exponential_decay_schedule": "tests/test_schedules_catalogue.py",
    # the table's step passes no loss; reduce_on_plateau needs value=
    "reduce_on_plateau": "tests/test_plateau.py",
}
