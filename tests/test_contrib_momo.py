"""MoMo and MoMo-Adam against optax.contrib, with the loss passed as ``value=``.

The conformance table's step passes no loss, so these optimizers are checked
here: 8 steps of a quadratic through ``Optimizer.step(..., value=loss)`` under
``jax.jit``, equal to optax's on float32 parameters; the same numbers under ZeRO
stage 3; a step on the mixed bfloat16/float32 tree; and the errors for a
missing or non-scalar loss.

Parity runs without the table's bfloat16 leaf: on a tree that mixes dtypes
optax averages the loss in bfloat16 (the lowest dtype; a loss of 164 moves in
steps of 1, and XLA's fusion decides whether intermediates are rounded, so
eager and jitted optax disagree), where shardopt keeps its scalars in float32
(see ``shardopt.momo``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import (
    BF16_RTOL,
    DECIMAL_BETAS_RTOL,
    EXACT_B1,
    EXACT_B2,
    make_params,
    make_shardable_params,
)
from jax.sharding import Mesh
from value_runs import STEPS, run_optax, run_ours

import shardopt


def _difference(got, want):
    """Per leaf: max |got - want| / max |want|."""
    out = {}
    for name in want:
        g = np.asarray(got[name], np.float64)
        w = np.asarray(want[name], np.float64)
        out[name] = float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
        assert got[name].dtype == want[name].dtype, name
    return out


def _float32_params():
    params = make_params()
    del params["half"]
    return params


def _lr(lib):
    return lib.linear_schedule(0.5, 0.1, STEPS)


# name -> (ours, optax, rtol for float32 leaves)
CASES = {
    "momo": (lambda: shardopt.momo(), lambda: optax.contrib.momo(), 1e-6),
    "momo_decay_adapt_lower_bound_schedule": (
        lambda: shardopt.momo(
            _lr(shardopt), EXACT_B1, weight_decay=0.125, adapt_lower_bound=True
        ),
        lambda: optax.contrib.momo(
            _lr(optax), EXACT_B1, weight_decay=0.125, adapt_lower_bound=True
        ),
        1e-6,
    ),
    "momo_high_lower_bound": (
        lambda: shardopt.momo(0.5, lower_bound=40.0),
        lambda: optax.contrib.momo(0.5, lower_bound=40.0),
        1e-6,
    ),
    # b1 = 0.9, b2 = 0.999: optax folds 1 - b in float64 (DECIMAL_BETAS_RTOL)
    "momo_adam": (
        lambda: shardopt.momo_adam(),
        lambda: optax.contrib.momo_adam(),
        DECIMAL_BETAS_RTOL,
    ),
    "momo_adam_decay_adapt_lower_bound_exact_betas": (
        lambda: shardopt.momo_adam(
            0.1, EXACT_B1, EXACT_B2, weight_decay=0.125, adapt_lower_bound=True
        ),
        lambda: optax.contrib.momo_adam(
            0.1, EXACT_B1, EXACT_B2, weight_decay=0.125, adapt_lower_bound=True
        ),
        1e-6,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_optax_with_the_loss(case):
    ours, oracle, rtol = CASES[case]
    params = _float32_params()
    got, opt = run_ours(ours(), params)
    want = run_optax(oracle(), params)
    differences = _difference(got, want)
    for name, difference in differences.items():
        bound = BF16_RTOL if want[name].dtype == jnp.bfloat16 else rtol
        assert difference <= bound, (name, differences)
    assert opt.count == STEPS
    moved = np.max(np.abs(np.asarray(got["cube"]) - np.asarray(params["cube"])))
    assert moved > 1e-3  # the step is not the degenerate zero


@pytest.mark.parametrize("name", ["momo", "momo_adam"])
def test_zero_stage_3_matches_unsharded(name):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    plan = shardopt.zero(3, mesh, min_size=0)
    # float32 leaves: a bfloat16 leaf's rounding flips by one ulp (0.4%) on a
    # different summation order of the loss, and the global step size carries it
    params = make_shardable_params()
    del params["half"]
    make = getattr(shardopt, name)
    want, want_opt = run_ours(make(), params)
    got, got_opt = run_ours(make(), plan.shard_params(params), plan)
    for tree_got, tree_want in ((got, want), (got_opt.state, want_opt.state)):
        for g, w in zip(
            jax.tree.leaves(tree_got), jax.tree.leaves(tree_want), strict=True
        ):
            assert g.dtype == w.dtype
            np.testing.assert_allclose(
                np.asarray(g, np.float64),
                np.asarray(w, np.float64),
                rtol=BF16_RTOL if w.dtype == jnp.bfloat16 else 1e-6,
                atol=1e-7,
            )


@pytest.mark.parametrize("name", ["momo", "momo_adam"])
def test_step_without_value_is_rejected(name):
    params = {"w": jnp.ones(3)}
    opt = shardopt.Optimizer(getattr(shardopt, name)(), params)
    with pytest.raises(ValueError, match=rf"{name} needs the loss.*value="):
        opt.step(params, {"w": jnp.ones(3)})


@pytest.mark.parametrize("name", ["momo", "momo_adam"])
def test_scalars_are_float32_on_a_mixed_tree(name):
    params = make_params()
    new, opt = run_ours(getattr(shardopt, name)(), params)
    for scalar in (opt.state.barf, opt.state.gamma, opt.state.lb):
        assert scalar.dtype == jnp.float32
    for leaf in params:
        assert new[leaf].dtype == params[leaf].dtype
        assert np.all(np.isfinite(np.asarray(new[leaf], np.float32)))
    assert not np.array_equal(np.asarray(new["half"]), np.asarray(params["half"]))


def test_value_must_be_a_scalar():
    params = {"w": jnp.ones(3)}
    opt = shardopt.Optimizer(shardopt.momo(), params)
    with pytest.raises(ValueError, match=r"value must be a scalar loss.*\(3,\)"):
        opt.step(params, {"w": jnp.ones(3)}, value=jnp.ones(3))


def test_zero_momentum_takes_no_step():
    params = {"w": jnp.ones(3)}
    opt = shardopt.Optimizer(shardopt.momo(), params)
    new, _ = opt.step(params, {"w": jnp.zeros(3)}, value=jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(new["w"]), np.ones(3))
