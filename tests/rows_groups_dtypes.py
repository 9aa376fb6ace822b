"""Rows for parameter groups by path and for the moments' storage dtypes.

Groups are checked against ``optax.partition`` with the equivalent labels
written out by hand; storage dtypes against optax where optax has the argument
(``mu_dtype``, ``accumulator_dtype``), and against an optax-built reference
that stores the second moment rounded where optax has none (``nu_dtype``).
"""

import re

import jax
import jax.numpy as jnp
import optax
from conformance import EXACT_B1, EXACT_B2, Row

import shardopt

# The conformance tree: scalar, vector, matrix (8x3), cube (3x5x16), half
# (bfloat16 16x3). Labels as optax.partition needs them, for each grouping.
_HIDDEN_LABELS = {
    "scalar": "frozen",
    "vector": "default",
    "matrix": "hidden",
    "cube": "hidden",
    "half": "default",
}


def _groups_by_glob():
    return shardopt.param_groups(
        shardopt.sgd(3e-2, momentum=0.9),
        hidden=shardopt.group(
            "matrix", "cu*", transform=shardopt.adam(1e-2, EXACT_B1, EXACT_B2)
        ),
        frozen=shardopt.group("scalar", frozen=True),
    )


def _partition_by_glob():
    return optax.partition(
        {
            "default": optax.sgd(3e-2, momentum=0.9),
            "hidden": optax.adam(1e-2, EXACT_B1, EXACT_B2),
            "frozen": optax.set_to_zero(),
        },
        _HIDDEN_LABELS,
    )


def _is_cube(path, leaf):
    return leaf.ndim == 3


def _groups_by_regex_and_predicate():
    # per-group learning rate and weight decay, changed on the default AdamW
    return shardopt.param_groups(
        shardopt.adamw(1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1),
        slow=shardopt.group(re.compile("ma.*x"), _is_cube, learning_rate=1e-3),
        no_decay=shardopt.group(re.compile("vector|half"), weight_decay=0.0),
    )


def _partition_by_regex_and_predicate():
    labels = {
        "scalar": "default",
        "vector": "no_decay",
        "matrix": "slow",
        "cube": "slow",
        "half": "no_decay",
    }
    return optax.partition(
        {
            "default": optax.adamw(1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1),
            "slow": optax.adamw(1e-3, EXACT_B1, EXACT_B2, weight_decay=0.1),
            "no_decay": optax.adamw(1e-2, EXACT_B1, EXACT_B2, weight_decay=0.0),
        },
        labels,
    )


def _adam_nu_stored_in(dtype, learning_rate=1e-2):
    """optax's adam with the second moment kept in ``dtype``: ``nu`` updated in
    float32 from the stored value, used unrounded this step, stored rounded."""
    adam = optax.scale_by_adam(EXACT_B1, EXACT_B2)

    def init(params):
        state = adam.init(params)
        nu = jax.tree.map(lambda v: v.astype(dtype), state.nu)
        return state._replace(nu=nu)

    def update(grads, state, params=None):
        wide = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
        cast_back = lambda t, like: jax.tree.map(
            lambda x, r: x.astype(r.dtype), t, like
        )
        # float32 arithmetic on both moments, as for float32 params
        inner = state._replace(mu=wide(state.mu), nu=wide(state.nu))
        updates, new = adam.update(wide(grads), inner, params)
        new = new._replace(
            mu=cast_back(new.mu, state.mu), nu=cast_back(new.nu, state.nu)
        )
        updates = jax.tree.map(lambda u: -learning_rate * u, updates)
        return updates, new

    return optax.GradientTransformation(init, update)


ROWS = [
    Row("param_groups_glob_vs_partition", _groups_by_glob, _partition_by_glob),
    Row(
        "param_groups_regex_predicate_lr_decay_vs_partition",
        _groups_by_regex_and_predicate,
        _partition_by_regex_and_predicate,
    ),
    # optax's own dtype arguments: the same numbers as optax
    Row(
        "adam_mu_dtype_bfloat16",
        lambda: shardopt.adam(1e-2, EXACT_B1, EXACT_B2, mu_dtype=jnp.bfloat16),
        lambda: optax.adam(1e-2, EXACT_B1, EXACT_B2, mu_dtype=jnp.bfloat16),
    ),
    Row(
        "adamw_mu_dtype_bfloat16",
        lambda: shardopt.adamw(
            1e-2, EXACT_B1, EXACT_B2, mu_dtype=jnp.bfloat16, weight_decay=0.1
        ),
        lambda: optax.adamw(
            1e-2, EXACT_B1, EXACT_B2, mu_dtype=jnp.bfloat16, weight_decay=0.1
        ),
    ),
    Row(
        "sgd_momentum_accumulator_dtype_bfloat16",
        lambda: shardopt.sgd(3e-2, EXACT_B1, accumulator_dtype=jnp.bfloat16),
        lambda: optax.sgd(3e-2, EXACT_B1, accumulator_dtype=jnp.bfloat16),
    ),
    Row(
        "lion_mu_dtype_bfloat16",
        lambda: shardopt.lion(1e-3, EXACT_B1, EXACT_B2, mu_dtype=jnp.bfloat16),
        lambda: optax.lion(1e-3, EXACT_B1, EXACT_B2, mu_dtype=jnp.bfloat16),
    ),
    # nu_dtype (optax has none): against optax's adam storing nu rounded
    Row(
        "adam_nu_dtype_bfloat16",
        lambda: shardopt.chain(
            shardopt.scale_by_adam(
                EXACT_B1, EXACT_B2, mu_dtype=jnp.float32, nu_dtype=jnp.bfloat16
            ),
            shardopt.scale(-1e-2),
        ),
        lambda: _adam_nu_stored_in(jnp.bfloat16),
    ),
]

# Public names of the groups module that build no transform, and their tests.
ELSEWHERE = {
    "group_table": "tests/test_groups.py (a table of the groups, no optimizer)"
}
