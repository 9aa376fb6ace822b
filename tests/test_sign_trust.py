"""What the conformance table cannot express for the sign / trust-ratio family.

polyak_sgd needs the loss at every step (``value=``), so it is checked here
against optax through ``Optimizer.step`` under ``jax.jit``; then noise keys,
Fromage's learning rate as one hyperparameter, and out-of-range arguments.
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import BF16_RTOL, make_params, make_shardable_params
from jax.sharding import Mesh
from value_runs import STEPS, run_optax, run_ours

import shardopt


def _assert_close(got, want):
    for name in want:
        g = np.asarray(got[name], np.float64)
        w = np.asarray(want[name], np.float64)
        bound = BF16_RTOL if want[name].dtype == jnp.bfloat16 else 1e-6
        scale = max(np.max(np.abs(w)), 1e-30)
        assert np.max(np.abs(g - w)) / scale <= bound, name
        assert got[name].dtype == want[name].dtype, name


POLYAK_CASES = {
    "defaults": {},
    "capped_scaled_eps": {"max_learning_rate": 0.05, "scaling": 0.5, "eps": 1e-2},
    # f_min above the minimum (0.1): the gap turns negative, sps+ clips it at 0
    "sps_plus_high_f_min": {"f_min": 40.0, "variant": "sps+"},
    "sps_high_f_min": {"f_min": 40.0},
}


@pytest.mark.parametrize("case", sorted(POLYAK_CASES))
def test_polyak_sgd_matches_optax(case):
    kwargs = POLYAK_CASES[case]
    params = make_params()
    got, opt = run_ours(shardopt.polyak_sgd(**kwargs), params)
    want = run_optax(optax.polyak_sgd(**kwargs), params)
    _assert_close(got, want)
    assert opt.count == STEPS
    moved = np.max(np.abs(np.asarray(got["cube"]) - np.asarray(params["cube"])))
    assert moved > 1e-3  # the step is not the degenerate zero


def test_polyak_sgd_schedule_scaling_matches_optax():
    schedule = lambda lib: lib.linear_schedule(1.0, 0.25, STEPS)
    params = make_params()
    got, _ = run_ours(shardopt.polyak_sgd(0.2, scaling=schedule(shardopt)), params)
    want = run_optax(optax.polyak_sgd(0.2, scaling=schedule(optax)), params)
    _assert_close(got, want)


def test_polyak_sgd_under_zero_stage_3_matches_unsharded():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    plan = shardopt.zero(3, mesh, min_size=0)
    params = make_shardable_params()
    want, _ = run_ours(shardopt.polyak_sgd(0.5), params)
    got, _ = run_ours(shardopt.polyak_sgd(0.5), plan.shard_params(params), plan)
    for name in want:
        np.testing.assert_allclose(
            np.asarray(got[name], np.float64),
            np.asarray(want[name], np.float64),
            rtol=BF16_RTOL if want[name].dtype == jnp.bfloat16 else 1e-6,
            atol=1e-7,
        )


def test_polyak_step_without_value_is_rejected():
    params = {"w": jnp.ones(3)}
    opt = shardopt.Optimizer(shardopt.polyak_sgd(), params)
    with pytest.raises(ValueError, match=r"needs the loss.*value="):
        opt.step(params, {"w": jnp.ones(3)})


def test_polyak_value_must_be_a_scalar():
    params = {"w": jnp.ones(3)}
    opt = shardopt.Optimizer(shardopt.polyak_sgd(), params)
    with pytest.raises(ValueError, match=r"value must be a scalar loss.*\(3,\)"):
        opt.step(params, {"w": jnp.ones(3)}, value=jnp.ones(3))


def test_polyak_zero_gradient_takes_no_step():
    params = {"w": jnp.ones(3)}
    opt = shardopt.Optimizer(shardopt.polyak_sgd(), params)
    new, _ = opt.step(params, {"w": jnp.zeros(3)}, value=jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(new["w"]), np.ones(3))


# --- gradient noise -------------------------------------------------------


def _noisy_params(transform, steps=3):
    params = {"w": jnp.zeros((4, 3)), "h": jnp.zeros((5,), jnp.bfloat16)}
    grads = jax.tree.map(jnp.zeros_like, params)
    opt = shardopt.Optimizer(transform, params)
    step = eqx.filter_jit(lambda p, o: o.step(p, grads))
    for _ in range(steps):
        params, opt = step(params, opt)
    return params


def test_noise_key_as_typed_key_or_seed_or_deprecated_seed():
    from_int = _noisy_params(shardopt.noisy_sgd(1.0, key=3))
    from_key = _noisy_params(shardopt.noisy_sgd(1.0, key=jax.random.key(3)))
    with pytest.warns(DeprecationWarning, match="seed"):
        transform = shardopt.noisy_sgd(1.0, seed=3)
    from_seed = _noisy_params(transform)
    other = _noisy_params(shardopt.noisy_sgd(1.0, key=4))
    for name in from_int:
        np.testing.assert_array_equal(from_int[name], from_key[name])
        np.testing.assert_array_equal(from_int[name], from_seed[name])
        assert not np.array_equal(from_int[name], other[name])
    assert from_int["h"].dtype == jnp.bfloat16


def test_noise_matches_optax_with_a_typed_key_of_another_impl():
    key = jax.random.key(5, impl="rbg")
    params = {"w": jnp.zeros((4, 3))}
    grads = {"w": jnp.ones((4, 3))}
    ours = shardopt.add_noise(0.3, 0.5, key)
    theirs = optax.add_noise(0.3, 0.5, key)
    state, other = ours.init(params), theirs.init(params)
    for _ in range(3):
        got, state = ours.update(grads, state)
        with jax.numpy_dtype_promotion("standard"):
            want, other = theirs.update(grads, other)
        np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))


def test_noise_without_key_warns_and_uses_seed_0():
    with pytest.warns(UserWarning, match="no key"):
        transform = shardopt.add_noise(0.01, 0.55)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seeded = shardopt.add_noise(0.01, 0.55, 0)
    np.testing.assert_array_equal(transform.key_data, seeded.key_data)


def test_noise_key_and_seed_together_are_rejected():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="not both"):
        shardopt.add_noise(0.01, 0.55, 1, seed=2)


@pytest.mark.parametrize("key", ["zero", 1.5, jax.random.split(jax.random.key(0))])
def test_noise_bad_key_is_rejected(key):
    with pytest.raises((TypeError, ValueError), match="key"):
        shardopt.add_noise(0.01, 0.55, key)


# --- Fromage's learning rate, Adadelta without one -------------------------


def _oracle_steps(transform, params, grads_fn, steps):
    with jax.numpy_dtype_promotion("standard"):
        state = transform.init(params)
        for i in range(steps):
            updates, state = transform.update(grads_fn(params, i), state, params)
            params = optax.apply_updates(params, updates)
    return params


def _grads(params, i):
    return jax.tree.map(lambda p: 0.5 * p + (i + 1.0) * 0.1, params)


def test_fromage_learning_rate_is_one_hyperparameter():
    params = {"w": jnp.arange(6.0).reshape(2, 3) - 2.0, "b": jnp.ones(3)}
    opt = shardopt.Optimizer(shardopt.fromage(0.5), params)
    opt = opt.with_hyperparameters(learning_rate=0.2)
    got = params
    for i in range(4):
        got, opt = opt.step(got, _grads(got, i))
    want = _oracle_steps(optax.fromage(0.2), params, _grads, 4)
    _assert_close(got, want)


def test_adadelta_without_learning_rate_matches_optax():
    params = {"w": jnp.arange(6.0).reshape(2, 3) - 2.0}
    opt = shardopt.Optimizer(shardopt.adadelta(), params)
    got = params
    for i in range(4):
        got, opt = opt.step(got, _grads(got, i))
    want = _oracle_steps(optax.adadelta(), params, _grads, 4)
    _assert_close(got, want)


def test_sign_of_zero_is_zero():
    params = {"w": jnp.ones(3)}
    opt = shardopt.Optimizer(shardopt.sign_sgd(0.1), params)
    new, _ = opt.step(params, {"w": jnp.array([2.0, 0.0, -3.0])})
    np.testing.assert_allclose(np.asarray(new["w"]), [0.9, 1.0, 1.1], rtol=1e-6)


@pytest.mark.parametrize(
    "transform",
    [
        shardopt.scale_by_trust_ratio(),
        shardopt.scale_by_param_block_norm(),
        shardopt.scale_by_param_block_rms(),
        shardopt.scale_by_distance_over_gradients(),
    ],
    ids=["trust_ratio", "block_norm", "block_rms", "dog"],
)
def test_transforms_that_need_params_say_so(transform):
    params = {"w": jnp.ones(3)}
    state = transform.init(params)
    with pytest.raises(ValueError, match="needs the parameters"):
        transform.update(params, state)


def test_trust_ratio_gradient_at_zero_parameters_is_finite():
    # the floored norm must not leak the NaN derivative of sqrt at 0
    transform = shardopt.scale_by_trust_ratio(min_norm=1e-3)
    state = transform.init({"w": jnp.zeros(3)})

    def total(scale):
        params = {"w": scale * jnp.zeros(3)}
        updates, _ = transform.update({"w": jnp.ones(3)}, state, params)
        return jnp.sum(updates["w"])

    assert np.isfinite(jax.grad(total)(jnp.float32(1.0)))


# --- out-of-range hyperparameters -----------------------------------------

BAD = [
    ("rprop_lr", lambda: shardopt.rprop(-1.0), "learning_rate", "-1.0"),
    (
        "rprop_eta_minus_0",
        lambda: shardopt.rprop(1.0, eta_minus=0.0),
        "eta_minus",
        "0.0",
    ),
    (
        "rprop_eta_minus_big",
        lambda: shardopt.scale_by_rprop(1.0, eta_minus=1.5),
        "eta_minus",
        "1.5",
    ),
    ("rprop_eta_plus", lambda: shardopt.rprop(1.0, eta_plus=0.9), "eta_plus", "0.9"),
    (
        "rprop_min_step",
        lambda: shardopt.rprop(1.0, min_step_size=-1e-3),
        "min_step_size",
        "-0.001",
    ),
    (
        "rprop_min_above_max",
        lambda: shardopt.rprop(1.0, min_step_size=2.0, max_step_size=1.0),
        "min_step_size",
        "2.0",
    ),
    ("adadelta_rho", lambda: shardopt.adadelta(1.0, rho=1.0), "rho", "1.0"),
    ("adadelta_eps", lambda: shardopt.scale_by_adadelta(eps=0.0), "eps", "0.0"),
    ("noise_eta", lambda: shardopt.add_noise(-0.1, 0.5, 0), "eta", "-0.1"),
    (
        "noise_gamma",
        lambda: shardopt.noisy_sgd(1.0, gamma=-1.0, key=0),
        "gamma",
        "-1.0",
    ),
    (
        "polyak_max_lr",
        lambda: shardopt.polyak_sgd(max_learning_rate=-1.0),
        "max_learning_rate",
        "-1.0",
    ),
    ("polyak_eps", lambda: shardopt.scale_by_polyak(eps=-1.0), "eps", "-1.0"),
    ("polyak_scaling", lambda: shardopt.polyak_sgd(scaling=-1.0), "scaling", "-1.0"),
    ("polyak_variant", lambda: shardopt.polyak_sgd(variant="sps-"), "variant", "sps-"),
    ("trust_min_norm", lambda: shardopt.fromage(1.0, min_norm=-1.0), "min_norm", ""),
    (
        "trust_coefficient",
        lambda: shardopt.lars(1.0, trust_coefficient=-0.1),
        "trust_coefficient",
        "-0.1",
    ),
    ("trust_eps", lambda: shardopt.scale_by_trust_ratio(eps=-1.0), "eps", "-1.0"),
    (
        "block_norm",
        lambda: shardopt.scale_by_param_block_norm(-1.0),
        "min_scale",
        "-1.0",
    ),
    ("block_rms", lambda: shardopt.scale_by_param_block_rms(-1.0), "min_scale", ""),
    (
        "dog_reps_rel",
        lambda: shardopt.scale_by_distance_over_gradients(reps_rel=0.0),
        "reps_rel",
        "0.0",
    ),
    (
        "dog_eps",
        lambda: shardopt.scale_by_distance_over_gradients(eps=-1.0),
        "eps",
        "-1.0",
    ),
    ("sign_sgd_lr", lambda: shardopt.sign_sgd(-1.0), "learning_rate", "-1.0"),
    ("signum_beta", lambda: shardopt.signum(1.0, beta=1.0), "beta", "1.0"),
    ("fromage_lr", lambda: shardopt.fromage(-0.5), "learning_rate", "-0.5"),
    ("lars_momentum", lambda: shardopt.lars(1.0, momentum=1.0), "momentum", "1.0"),
    ("lamb_b2", lambda: shardopt.lamb(1.0, b2=1.5), "b2", "1.5"),
    ("not_a_number", lambda: shardopt.lamb(1.0, eps=float("nan")), "eps", "nan"),
]


@pytest.mark.parametrize(
    "build, name, value", [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_out_of_range_hyperparameters_are_rejected(build, name, value):
    with pytest.raises(ValueError) as err:
        build()
    message = str(err.value)
    assert name in message and value in message, message
