"""Rows of the structural family: partitions, freezing, named chains, flat views,
functions as transforms, non-negative parameters, centralised and normalised
updates. Each row builds the same construction from shardopt and from optax."""

import jax
import jax.numpy as jnp
import optax
from conformance import EXACT_B1, EXACT_B2, Row

import shardopt

# The conformance tree: scalar, vector, matrix, cube, half (bfloat16).
LABELS = {
    "scalar": "zero",
    "vector": "sgd",
    "matrix": "adam",
    "cube": "adam",
    "half": "sgd",
}
FROZEN = {"scalar": False, "vector": True, "matrix": False, "cube": True, "half": False}


def _label_by_rank(params):
    return jax.tree.map(lambda p: "adam" if p.ndim >= 2 else "sgd", params)


def _decay_towards_zero(updates, params):
    return jax.tree.map(lambda g, p: g + 0.1 * p, updates, params)


def _scale_by_tanh_of_param(g, p):
    return g * jnp.tanh(p)


def _partition(lib):
    return lib.partition(
        {
            "adam": lib.adam(1e-2, EXACT_B1, EXACT_B2),
            "sgd": lib.sgd(3e-2, momentum=0.9),
            "zero": lib.set_to_zero(),
        },
        LABELS,
    )


ROWS = [
    # a label tree; set_to_zero for one label; under ZeRO the inner moments are
    # partitioned like their parameters (the sharded column checks the numbers).
    Row(
        "partition_adam_sgd_zero",
        lambda: _partition(shardopt),
        lambda: _partition(optax),
    ),
    # a label function, and an optax transform for one label.
    Row(
        "multi_transform_label_fn_optax_inner",
        lambda: shardopt.multi_transform(
            {"adam": shardopt.adam(1e-2, EXACT_B1, EXACT_B2), "sgd": optax.sgd(3e-2)},
            _label_by_rank,
        ),
        lambda: optax.multi_transform(
            {"adam": optax.adam(1e-2, EXACT_B1, EXACT_B2), "sgd": optax.sgd(3e-2)},
            _label_by_rank,
        ),
    ),
    Row(
        "freeze_adam",
        lambda: shardopt.chain(
            shardopt.freeze(FROZEN), shardopt.adam(1e-2, EXACT_B1, EXACT_B2)
        ),
        lambda: optax.chain(optax.freeze(FROZEN), optax.adam(1e-2, EXACT_B1, EXACT_B2)),
    ),
    Row(
        "selective_transform_adam",
        lambda: shardopt.selective_transform(
            shardopt.adam(1e-2, EXACT_B1, EXACT_B2), freeze_mask=FROZEN
        ),
        lambda: optax.selective_transform(
            optax.adam(1e-2, EXACT_B1, EXACT_B2), freeze_mask=FROZEN
        ),
    ),
    Row(
        "named_chain_clip_adam",
        lambda: shardopt.named_chain(
            ("clip", shardopt.clip_by_global_norm(1.0)),
            ("adam", shardopt.adam(1e-2, EXACT_B1, EXACT_B2)),
        ),
        lambda: optax.named_chain(
            ("clip", optax.clip_by_global_norm(1.0)),
            ("adam", optax.adam(1e-2, EXACT_B1, EXACT_B2)),
        ),
    ),
    Row(
        "flatten_adam",
        lambda: shardopt.flatten(shardopt.adam(1e-2, EXACT_B1, EXACT_B2)),
        lambda: optax.flatten(optax.adam(1e-2, EXACT_B1, EXACT_B2)),
    ),
    Row(
        "stateless_scale",
        lambda: shardopt.chain(
            shardopt.stateless(_decay_towards_zero), shardopt.scale(-3e-2)
        ),
        lambda: optax.chain(optax.stateless(_decay_towards_zero), optax.scale(-3e-2)),
    ),
    Row(
        "stateless_with_tree_map_scale",
        lambda: shardopt.chain(
            shardopt.stateless_with_tree_map(_scale_by_tanh_of_param),
            shardopt.scale(-3e-2),
        ),
        lambda: optax.chain(
            optax.stateless_with_tree_map(_scale_by_tanh_of_param), optax.scale(-3e-2)
        ),
    ),
    Row(
        "sgd_keep_params_nonnegative",
        lambda: shardopt.chain(
            shardopt.sgd(0.1, momentum=0.5), shardopt.keep_params_nonnegative()
        ),
        lambda: optax.chain(
            optax.sgd(0.1, momentum=0.5), optax.keep_params_nonnegative()
        ),
    ),
    Row(
        "centralize_adam",
        lambda: shardopt.chain(
            shardopt.centralize(), shardopt.adam(1e-2, EXACT_B1, EXACT_B2)
        ),
        lambda: optax.chain(optax.centralize(), optax.adam(1e-2, EXACT_B1, EXACT_B2)),
    ),
    Row(
        "normalize_by_update_norm_scale",
        lambda: shardopt.chain(
            shardopt.normalize_by_update_norm(0.5, 1e-3), shardopt.scale(-0.1)
        ),
        lambda: optax.chain(
            optax.normalize_by_update_norm(0.5, 1e-3), optax.scale(-0.1)
        ),
    ),
]

# Functions of per-example gradients (a leading batch dim) or of the backward
# pass, not transforms of a step: tested against optax on their own.
ELSEWHERE = {
    "per_example_global_norm_clip": "tests/test_structural.py",
    "per_example_layer_norm_clip": "tests/test_structural.py",
    "scale_gradient": "tests/test_structural.py",
}
