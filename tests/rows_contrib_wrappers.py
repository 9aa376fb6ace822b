"""The conformance rows of optax.contrib's wrappers and their optimizers:
Mechanic, SAM, Schedule-Free, Sophia, GaLore, complex splitting.

Entries that the table's step cannot build (Sophia's Hutchinson estimate needs
the objective, DP-SGD per-example gradients, SAM's opaque mode a gradient
function) are checked against optax in tests/test_contrib_wrappers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import optax.contrib
from conformance import DECIMAL_BETAS_RTOL, EXACT_B1, EXACT_B2, Row, weight_mask

import shardopt

# optax's b1 is a Python constant, and XLA turns ``x / b1`` into ``x * (1/b1)``
# with the reciprocal rounded to float32; shardopt's b1 is a float32 leaf (so
# that changing it never recompiles) and divides exactly: the two differ by up
# to one ulp per step, about 1.5e-6 relative over the table's 50 steps. With
# b1 = 1/2 the reciprocal is exact and the rows agree to the bit.
CONSTANT_DIVISOR_RTOL = 2e-6
CONSTANT_DIVISOR_NOTE = "optax divides by b1 as a constant: XLA multiplies by 1/b1"

ROWS = [
    Row(
        # b1 = 1/2: its reciprocal is exact, so XLA's rewrite changes nothing
        "schedule_free_sgd_b1_half",
        lambda: shardopt.schedule_free_sgd(0.1, b1=0.5),
        lambda: optax.contrib.schedule_free_sgd(0.1, b1=0.5),
    ),
    Row(
        "schedule_free_sgd_defaults_warmup_decay",
        lambda: shardopt.schedule_free_sgd(0.1, warmup_steps=5, weight_decay=1e-2),
        lambda: optax.contrib.schedule_free_sgd(0.1, warmup_steps=5, weight_decay=1e-2),
        DECIMAL_BETAS_RTOL,
        "b1 = 0.9: optax folds 1 - b1 in float64, and divides by a constant",
    ),
    Row(
        "schedule_free_adamw_exact_betas",
        lambda: shardopt.schedule_free_adamw(
            1e-2, b1=EXACT_B1, b2=EXACT_B2, weight_decay=1e-2
        ),
        lambda: optax.contrib.schedule_free_adamw(
            1e-2, b1=EXACT_B1, b2=EXACT_B2, weight_decay=1e-2
        ),
        CONSTANT_DIVISOR_RTOL,
        CONSTANT_DIVISOR_NOTE,
    ),
    Row(
        "schedule_free_adam_f32_state_b1_half",
        lambda: shardopt.schedule_free(
            shardopt.adam(1e-2, 0.0, EXACT_B2), 1e-2, 0.5, state_dtype="float32"
        ),
        lambda: optax.contrib.schedule_free(
            optax.adam(1e-2, 0.0, EXACT_B2), 1e-2, 0.5, state_dtype="float32"
        ),
    ),
]


def _by_dtype(params):
    """optax's Mechanic needs one dtype (it clamps with mixed ones): float32
    leaves get Mechanic, the bfloat16 leaf the bare base optimizer."""
    return jax.tree.map(
        lambda p: "plain" if p.dtype == jnp.bfloat16 else "mech", params
    )


def _mechanic(lib, contrib, **kwargs):
    return lib.multi_transform(
        {
            "mech": contrib.mechanize(lib.adam(0.1, EXACT_B1, EXACT_B2), **kwargs),
            "plain": lib.adam(1e-2, EXACT_B1, EXACT_B2),
        },
        _by_dtype,
    )


ROWS += [
    Row(
        "mechanize_adam",
        lambda: _mechanic(shardopt, shardopt),
        lambda: _mechanic(optax, optax.contrib),
    ),
    Row(
        "mechanize_adam_decay_three_betas",
        lambda: _mechanic(
            shardopt, shardopt, weight_decay=0.1, s_init=1e-4, num_betas=3
        ),
        lambda: _mechanic(
            optax, optax.contrib, weight_decay=0.1, s_init=1e-4, num_betas=3
        ),
        CONSTANT_DIVISOR_RTOL,
        "one float32 rounding apart at some steps (XLA fuses the final update "
        "differently), grown by Mechanic's learned scale over 50 steps",
    ),
]


def _sam(lib, contrib, **kwargs):
    adversary = lib.chain(contrib.normalize(), lib.sgd(0.05))
    return contrib.sam(lib.sgd(3e-2, momentum=0.5), adversary, **kwargs)


ROWS += [
    Row("sam", lambda: _sam(shardopt, shardopt), lambda: _sam(optax, optax.contrib)),
    Row(
        "sam_period_3_keep_momentum_adam_outer",
        lambda: shardopt.sam(
            shardopt.adam(1e-2, EXACT_B1, EXACT_B2),
            shardopt.chain(shardopt.normalize(), shardopt.sgd(0.05, 0.5)),
            sync_period=3,
            reset_state=False,
        ),
        lambda: optax.contrib.sam(
            optax.adam(1e-2, EXACT_B1, EXACT_B2),
            optax.chain(optax.contrib.normalize(), optax.sgd(0.05, 0.5)),
            sync_period=3,
            reset_state=False,
        ),
    ),
]


def _galore(lib, contrib, **kwargs):
    return contrib.galore(
        1e-2,
        rank=2,
        update_proj_gap=5,
        base_optimizer=lib.scale_by_adam(EXACT_B1, EXACT_B2),
        **kwargs,
    )


def _galore_cube_dims(lib, contrib):
    """The cube (3, 5, 16) as a (15, 16) matrix; the bfloat16 leaf skipped."""
    dims = contrib.GaLoreDimensionNumbers

    def choose(params):
        out = {name: None for name in params}
        out["cube"] = dims(reduction_axis=(0, 1), output_axis=2)
        out["matrix"] = dims(0, 1)
        return out

    return choose


ROWS += [
    Row(
        "galore",
        lambda: _galore(shardopt, shardopt),
        lambda: _galore(optax, optax.contrib),
    ),
    Row(
        "galore_dimension_numbers_decay_masked",
        lambda: _galore(
            shardopt,
            shardopt,
            weight_decay=0.1,
            mask=weight_mask,
            weight_dimension_numbers=_galore_cube_dims(shardopt, shardopt),
        ),
        lambda: _galore(
            optax,
            optax.contrib,
            weight_decay=0.1,
            mask=weight_mask,
            weight_dimension_numbers=_galore_cube_dims(optax, optax.contrib),
        ),
    ),
    Row(
        "split_real_and_imaginary_adam_real_leaves",
        lambda: shardopt.split_real_and_imaginary(
            shardopt.adam(1e-2, EXACT_B1, EXACT_B2)
        ),
        lambda: optax.contrib.split_real_and_imaginary(
            optax.adam(1e-2, EXACT_B1, EXACT_B2)
        ),
    ),
]


def _squared_gradient(updates, params):
    """A Hessian-diagonal stand-in that needs no objective (Gauss-Newton-like)."""
    del params
    return jax.tree.map(lambda g: g * g, updates)


def _sophia(lib, contrib, **kwargs):
    return contrib.sophia(
        1e-2,
        EXACT_B1,
        EXACT_B2,
        update_interval=3,
        hessian_diagonal_fn=lib.stateless(_squared_gradient),
        **kwargs,
    )


ROWS += [
    Row(
        "sophia_squared_gradient_estimate",
        lambda: _sophia(shardopt, shardopt),
        lambda: _sophia(optax, optax.contrib),
    ),
    Row(
        "sophia_no_clip_masked_decay_f32_mu",
        lambda: _sophia(
            shardopt,
            shardopt,
            clip_threshold=None,
            weight_decay=0.1,
            weight_decay_mask=weight_mask,
            mu_dtype=jnp.float32,
        ),
        lambda: _sophia(
            optax,
            optax.contrib,
            clip_threshold=None,
            weight_decay=0.1,
            weight_decay_mask=weight_mask,
            mu_dtype=jnp.float32,
        ),
    ),
]

ELSEWHERE: dict[str, str] = {
    "schedule_free_eval_params": "tests/test_contrib_wrappers.py (optax's values)",
    "hutchinson_estimator_diag_hessian": "tests/test_contrib_wrappers.py (obj_fn=)",
    "dpsgd": "tests/test_contrib_wrappers.py (per-example gradients)",
    "differentially_private_aggregate": "tests/test_contrib_wrappers.py",
}
