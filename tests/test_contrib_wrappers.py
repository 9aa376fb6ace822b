"""What the conformance table cannot express for optax.contrib's wrappers.

Sophia's Hutchinson estimate needs the objective (``obj_fn=``), DP-SGD takes
per-example gradients, SAM's opaque mode a gradient function, and complex
parameters need complex gradients: each is checked against optax through
``Optimizer.step`` under ``jax.jit``, and under a ZeRO stage against the
unsharded run. Then schedule_free_eval_params, GaLore's dimension numbers,
and bad input.
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from conformance import BF16_RTOL, EXACT_B1, EXACT_B2, make_shardable_params
from jax.sharding import Mesh
from value_runs import targets as make_targets

import shardopt

STEPS = 6


def _mesh8():
    return Mesh(np.array(jax.devices()), ("data",))


def _f32_params():
    """The table's tree without its bfloat16 leaf (optax's Hutchinson estimate
    casts every sign to the tree's lowest dtype, which jvp rejects for mixed
    trees)."""
    params = make_shardable_params()
    del params["half"]
    return params


def _loss(params, targets):
    """A quartic-plus-quadratic: its Hessian varies with the parameters."""
    total = jnp.float32(0.0)
    for name in sorted(params):
        d = params[name].astype(jnp.float32) - targets[name]
        total = total + jnp.sum(0.5 * d * d + 0.1 * d**4)
    return total


def _assert_close(got, want, rtol=1e-6):
    for name in want:
        wide = np.complex128 if jnp.iscomplexobj(want[name]) else np.float64
        g = np.asarray(got[name]).astype(wide)
        w = np.asarray(want[name]).astype(wide)
        bound = BF16_RTOL if want[name].dtype == jnp.bfloat16 else rtol
        scale = max(np.max(np.abs(w)), 1e-30)
        assert np.max(np.abs(g - w)) / scale <= bound, (name, np.max(np.abs(g - w)))
        assert got[name].dtype == want[name].dtype, name


# ------------------------------------------------------------------ Sophia
def _sophia_ours(transform, params, plan=None):
    targets = make_targets(params)
    if plan is not None:
        params = plan.shard_params(params)
    opt = shardopt.Optimizer(transform, params, plan=plan)

    @eqx.filter_jit
    def step(params, opt):
        grads = jax.grad(_loss)(params, targets)
        return opt.step(params, grads, obj_fn=lambda p: _loss(p, targets))

    for _ in range(STEPS):
        params, opt = step(params, opt)
    return params, opt


def _sophia_optax(transform, params):
    targets = make_targets(params)
    with jax.numpy_dtype_promotion("standard"):
        state = transform.init(params)

        @jax.jit
        def step(params, state):
            grads = jax.grad(_loss)(params, targets)
            updates, state = transform.update(
                grads, state, params, obj_fn=lambda p: _loss(p, targets)
            )
            return optax.apply_updates(params, updates), state

        for _ in range(STEPS):
            params, state = step(params, state)
    return params


SOPHIA_CASES = {
    "defaults": {},
    "every_other_step_seeded": {
        "update_interval": 2,
        "hessian_diagonal_fn": "seed",
        "gamma": 0.05,
    },
}


def _sophia_kwargs(lib, case):
    kwargs = dict(SOPHIA_CASES[case])
    if kwargs.get("hessian_diagonal_fn") == "seed":
        estimator = (
            lib.hutchinson_estimator_diag_hessian
            if lib is shardopt
            else optax.contrib.hutchinson_estimator_diag_hessian
        )
        kwargs["hessian_diagonal_fn"] = estimator(jax.random.key(3))
    return kwargs


@pytest.mark.parametrize("case", sorted(SOPHIA_CASES))
def test_sophia_with_hutchinson_matches_optax(case):
    params = _f32_params()
    ours = shardopt.sophia(0.1, EXACT_B1, EXACT_B2, **_sophia_kwargs(shardopt, case))
    theirs = optax.contrib.sophia(
        0.1, EXACT_B1, EXACT_B2, **_sophia_kwargs(optax, case)
    )
    got, opt = _sophia_ours(ours, params)
    _assert_close(got, _sophia_optax(theirs, params))
    assert opt.count == STEPS
    nu = opt.state[0].nu["cube"]
    assert float(jnp.max(jnp.abs(nu))) > 0  # the estimate was taken


def test_sophia_under_zero_3_matches_unsharded():
    params = make_shardable_params()  # bfloat16 too: signs are cast per leaf
    transform = shardopt.sophia(0.1, EXACT_B1, EXACT_B2, update_interval=2)
    want, _ = _sophia_ours(transform, params)
    got, opt = _sophia_ours(transform, params, shardopt.zero(3, _mesh8(), min_size=0))
    _assert_close(got, want)
    assert "data" in str(opt.state[0].nu["matrix"].sharding.spec)


def test_hutchinson_needs_obj_fn():
    params = {"w": jnp.ones(3)}
    opt = shardopt.Optimizer(shardopt.sophia(0.1, update_interval=1), params)
    with pytest.raises(ValueError, match="obj_fn must be provided"):
        opt.step(params, {"w": jnp.ones(3)})


def test_obj_fn_sees_an_equinox_model_whole():
    model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    x = jnp.ones((4, 3))
    loss = lambda m: jnp.sum(jax.vmap(m)(x) ** 2)
    opt = shardopt.Optimizer(shardopt.sophia(0.1, update_interval=1), model)
    grads = eqx.filter_grad(loss)(model)
    new, opt = eqx.filter_jit(lambda m, o, g: o.step(m, g, obj_fn=loss))(
        model, opt, grads
    )
    assert float(loss(new)) < float(loss(model))


# ------------------------------------------------------------------ DP-SGD
BATCH = 4


def _examples():
    return jax.random.normal(jax.random.key(11), (BATCH, 3))


def _example_loss(params, x):
    total = jnp.float32(0.0)
    for name in sorted(params):
        p = params[name].astype(jnp.float32)
        total = total + jnp.sum(jnp.sin(p * jnp.sum(x))) + 0.5 * jnp.sum(p * p)
    return total


def _per_example_grads(params, x):
    return jax.vmap(jax.grad(_example_loss), in_axes=(None, 0))(params, x)


def _dpsgd_ours(transform, params, plan=None):
    x = _examples()
    if plan is not None:
        params = plan.shard_params(params)
    opt = shardopt.Optimizer(transform, params, plan=plan)
    step = eqx.filter_jit(lambda p, o: o.step(p, _per_example_grads(p, x)))
    for _ in range(STEPS):
        params, opt = step(params, opt)
    return params, opt


def _dpsgd_optax(transform, params):
    x = _examples()
    with jax.numpy_dtype_promotion("standard"):
        state = transform.init(params)

        @jax.jit
        def step(params, state):
            updates, state = transform.update(
                _per_example_grads(params, x), state, params
            )
            return optax.apply_updates(params, updates), state

        for _ in range(STEPS):
            params, state = step(params, state)
    return params


DPSGD_CASES = {
    "plain": {},
    "momentum_nesterov": {"momentum": 0.5, "nesterov": True},
}


@pytest.mark.parametrize("case", sorted(DPSGD_CASES))
def test_dpsgd_matches_optax(case):
    kwargs = DPSGD_CASES[case]
    params = make_shardable_params()
    got, opt = _dpsgd_ours(shardopt.dpsgd(0.1, 1.0, 0.5, 42, **kwargs), params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # optax's own seed=
        theirs = optax.contrib.dpsgd(0.1, 1.0, 0.5, 42, **kwargs)
    _assert_close(got, _dpsgd_optax(theirs, params))
    assert opt.count == STEPS


def test_dp_aggregate_keys_match_optax():
    params = _f32_params()
    key = jax.random.key(5, impl="rbg")
    ours = shardopt.differentially_private_aggregate(0.3, 2.0, key)
    theirs = optax.contrib.differentially_private_aggregate(0.3, 2.0, key)
    grads = _per_example_grads(params, _examples())
    state, other = ours.init(params), theirs.init(params)
    for _ in range(2):
        got, state = ours.update(grads, state)
        with jax.numpy_dtype_promotion("standard"):
            want, other = theirs.update(grads, other)
        for name in want:
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))


def test_dpsgd_under_zero_1_matches_unsharded():
    params = make_shardable_params()
    transform = shardopt.dpsgd(0.1, 1.0, 0.5, 0, momentum=0.9)
    want, _ = _dpsgd_ours(transform, params)
    got, opt = _dpsgd_ours(transform, params, shardopt.zero(1, _mesh8(), min_size=0))
    _assert_close(got, want)
    assert "data" in str(opt.state[1].trace["matrix"].sharding.spec)


def test_dpsgd_rejects_gradients_without_a_batch_dim():
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    opt = shardopt.Optimizer(shardopt.dpsgd(0.1, 1.0, 0.5, 0), params)
    with pytest.raises(ValueError, match=r"per-example gradients.*\['w'\].*batch,2,3"):
        opt.step(params, {"w": jnp.ones((2, 3)), "b": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match="disagree on the batch size"):
        opt.step(params, {"w": jnp.ones((4, 2, 3)), "b": jnp.ones((5, 3))})


# ------------------------------------------------------------------ SAM
def _sam_pair(lib, contrib):
    adversary = lib.chain(contrib.normalize(), lib.sgd(0.05))
    return contrib.sam(lib.sgd(0.1), adversary, sync_period=3, opaque_mode=True)


def test_sam_opaque_mode_matches_optax():
    params = make_shardable_params()
    targets = make_targets(params)
    grad_fn = jax.grad(lambda p, _: _loss(p, targets))
    opt = shardopt.Optimizer(_sam_pair(shardopt, shardopt), params)

    @eqx.filter_jit
    def step(params, opt):
        return opt.step(params, grad_fn(params, 0), grad_fn=grad_fn)

    got = params
    for _ in range(STEPS):
        got, opt = step(got, opt)
    transform = _sam_pair(optax, optax.contrib)
    want = params
    with jax.numpy_dtype_promotion("standard"):
        state = transform.init(params)

        @jax.jit
        def step_optax(params, state):
            updates, state = transform.update(
                grad_fn(params, 0), state, params, grad_fn=grad_fn
            )
            return optax.apply_updates(params, updates), state

        for _ in range(STEPS):
            want, state = step_optax(want, state)
    _assert_close(got, want)
    assert opt.state.cache is None


def test_sam_opaque_mode_needs_grad_fn():
    params = {"w": jnp.ones(3)}
    opt = shardopt.Optimizer(_sam_pair(shardopt, shardopt), params)
    with pytest.raises(ValueError, match="needs grad_fn="):
        opt.step(params, {"w": jnp.ones(3)})


# ------------------------------------------------------------------ complex
def _complex_params():
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    z = jax.lax.complex(jax.random.normal(k1, (8, 3)), jax.random.normal(k2, (8, 3)))
    return {"z": z, "r": jax.random.normal(k3, (16,))}


TARGET = jnp.asarray(1 + 2j, jnp.complex64)


def _complex_loss(params):
    z = params["z"]
    return jnp.sum(jnp.abs(z - TARGET) ** 2) + jnp.sum(params["r"] ** 2)


def _complex_run(transform, plan=None, optax_style=False):
    params = _complex_params()
    # JAX's gradient of a real loss is the conjugate of the ascent direction
    grad = lambda p: jax.tree.map(jnp.conj, jax.grad(_complex_loss)(p))
    if optax_style:
        with jax.numpy_dtype_promotion("standard"):
            state = transform.init(params)

            @jax.jit
            def step(p, s):
                updates, s = transform.update(grad(p), s, p)
                return optax.apply_updates(p, updates), s

            for _ in range(STEPS):
                params, state = step(params, state)
        return params
    if plan is not None:
        params = plan.shard_params(params)
    opt = shardopt.Optimizer(transform, params, plan=plan)
    step = eqx.filter_jit(lambda p, o: o.step(p, grad(p)))
    for _ in range(STEPS):
        params, opt = step(params, opt)
    return params


def test_split_real_and_imaginary_matches_optax_on_complex_params():
    ours = shardopt.split_real_and_imaginary(shardopt.adam(0.1, EXACT_B1, EXACT_B2))
    theirs = optax.contrib.split_real_and_imaginary(optax.adam(0.1, EXACT_B1, EXACT_B2))
    got = _complex_run(ours)
    want = _complex_run(theirs, optax_style=True)
    assert got["z"].dtype == jnp.complex64
    _assert_close(got, want)
    # it moved toward 1 + 2i
    start = _complex_params()["z"]
    assert float(jnp.mean(jnp.abs(got["z"] - TARGET))) < float(
        jnp.mean(jnp.abs(start - TARGET))
    )


def test_split_real_and_imaginary_under_zero_1_matches_unsharded():
    transform = shardopt.split_real_and_imaginary(
        shardopt.adam(0.1, EXACT_B1, EXACT_B2)
    )
    want = _complex_run(transform)
    got = _complex_run(transform, plan=shardopt.zero(1, _mesh8(), min_size=0))
    _assert_close(got, want)


# ------------------------------------------------------------------ Schedule-Free
def test_schedule_free_eval_params_match_optax():
    params = make_shardable_params()
    targets = make_targets(params)
    ours = shardopt.schedule_free_adamw(0.05, b1=EXACT_B1, b2=EXACT_B2)
    theirs = optax.contrib.schedule_free_adamw(0.05, b1=EXACT_B1, b2=EXACT_B2)
    opt = shardopt.Optimizer(ours, params)
    with jax.numpy_dtype_promotion("standard"):
        state = theirs.init(params)
    got = want = params
    for _ in range(3):
        grads = jax.grad(_loss)(got, targets)
        got, opt = opt.step(got, grads)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = theirs.update(jax.grad(_loss)(want, targets), state, want)
        want = optax.apply_updates(want, updates)
    with jax.numpy_dtype_promotion("standard"):
        want_eval = optax.contrib.schedule_free_eval_params(state, want)
    _assert_close(shardopt.schedule_free_eval_params(opt.state, got), want_eval)
    # the Optimizer itself, and a chain holding the state, are found too
    _assert_close(shardopt.schedule_free_eval_params(opt, got), want_eval)
    assert opt.state.b1.dtype == jnp.bfloat16  # the lowest dtype, as optax's


def test_schedule_free_eval_params_in_a_chain_and_bad_state():
    params = {"w": jnp.ones(3)}
    opt = shardopt.Optimizer(
        shardopt.chain(
            shardopt.clip_by_global_norm(1.0), shardopt.schedule_free_sgd(0.1)
        ),
        params,
    )
    params, opt = opt.step(params, {"w": jnp.ones(3)})
    x = shardopt.schedule_free_eval_params(opt, params)
    np.testing.assert_allclose(
        np.asarray(x["w"]),
        np.asarray((params["w"] - 0.1 * opt.state[1].z["w"]) / 0.9),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="found 0"):
        shardopt.schedule_free_eval_params(
            shardopt.Optimizer(shardopt.sgd(1.0), params), params
        )


def test_schedule_free_rejects_b1_out_of_range():
    with pytest.raises(ValueError, match=r"b1 must be in \(0, 1\]"):
        shardopt.schedule_free_sgd(b1=0.0)


# ------------------------------------------------------------------ Mechanic
def test_mechanize_on_mixed_dtypes_keeps_its_state_dtypes():
    """optax's Mechanic fails on a bfloat16 + float32 tree (lax.clamp of mixed
    dtypes); here h is rounded to the state's dtype, which stays put."""
    params = make_shardable_params()
    opt = shardopt.Optimizer(shardopt.mechanize(shardopt.adam(0.1)), params)
    step = eqx.filter_jit(lambda p, o: o.step(p, jax.tree.map(jnp.ones_like, p)))
    for _ in range(3):
        params, opt = step(params, opt)
    assert opt.state.s.dtype == jnp.bfloat16
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


# ------------------------------------------------------------------ GaLore
def test_galore_takes_optax_dimension_numbers():
    dims = {"w": optax.contrib.GaLoreDimensionNumbers((0, 1), 2), "b": None}
    params = {"w": jnp.ones((2, 3, 4)), "b": jnp.ones(4)}
    opt = shardopt.Optimizer(
        shardopt.galore(0.1, rank=2, weight_dimension_numbers=dims), params
    )
    assert opt.state[0].projector["w"].shape == (6, 2)


def test_galore_bad_dimension_numbers():
    params = {"w": jnp.ones((2, 3, 4))}
    dims = shardopt.GaLoreDimensionNumbers(0, 1)  # axis 2 named by neither
    with pytest.raises(ValueError, match="All axes must be specified"):
        shardopt.Optimizer(shardopt.galore(0.1, weight_dimension_numbers=dims), params)
    with pytest.raises(ValueError, match="`rank` must be positive"):
        shardopt.galore(0.1, rank=0)


# ------------------------------------------------------------------ hyperparameters
def test_schedule_free_learning_rate_is_one_leaf_for_base_and_weights():
    params = {"w": jnp.ones(3)}
    opt = shardopt.Optimizer(shardopt.schedule_free_adamw(0.1), params)
    opt = opt.with_hyperparameters(learning_rate=0.05, b1=0.5)
    assert float(opt.transform.learning_rate) == pytest.approx(0.05)
    assert float(opt.transform.base_optimizer.transforms[-1].learning_rate) == (
        pytest.approx(0.05)
    )
    assert float(opt.transform.b1) == 0.5
    assert opt.transform.learning_rate.dtype == jnp.float32


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_betas must be >= 1"):
        shardopt.mechanize(shardopt.sgd(1.0), num_betas=0)
    with pytest.raises(ValueError, match="s_init must be > 0"):
        shardopt.mechanize(shardopt.sgd(1.0), s_init=0.0)
    with pytest.raises(ValueError, match="sync_period must be >= 1"):
        shardopt.sam(shardopt.sgd(1.0), shardopt.sgd(1.0), sync_period=0)
    with pytest.raises(TypeError, match="sam's adv_optimizer"):
        shardopt.sam(shardopt.sgd(1.0), "sgd")
    with pytest.raises(ValueError, match="update_interval must be >= 1"):
        shardopt.sophia(0.1, update_interval=0)
    with pytest.raises(ValueError, match="clip_threshold must be > 0"):
        shardopt.sophia(0.1, clip_threshold=-1.0)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        shardopt.dpsgd(0.1, 1.0, -0.5, 0)
    with pytest.raises(TypeError, match="key must be a PRNG key or an integer"):
        shardopt.differentially_private_aggregate(1.0, 0.5, "seed")


def test_sam_opaque_grad_fn_sees_an_equinox_model_whole():
    model = eqx.nn.MLP(3, 1, 4, 1, key=jax.random.key(0))
    x = jnp.ones((4, 3))
    loss = lambda m: jnp.sum(jax.vmap(m)(x) ** 2)
    grad_fn = lambda m, _: eqx.filter_grad(loss)(m)
    opt = shardopt.Optimizer(_sam_pair(shardopt, shardopt), model)
    step = eqx.filter_jit(lambda m, o: o.step(m, grad_fn(m, 0), grad_fn=grad_fn))
    new, opt = step(model, opt)
    assert float(loss(new)) < float(loss(model))
