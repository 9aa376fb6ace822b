"""inject_hyperparams: optax's wrapper, with the hyperparameters in the state."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import gradient as table_gradient
from conformance import make_params, relative_difference

import shardopt

STEPS = 12


def gradient(params, step):
    """The table's gradient, for any subset of its parameters."""
    full = table_gradient({**make_params(), **params}, step)
    return {name: full[name] for name in params}


def float32_params():
    return {k: v for k, v in make_params().items() if v.dtype == jnp.float32}


def run(tx, params, steps=STEPS, standard=False, change=None):
    """``steps`` jitted updates; ``change(state, i)`` may edit the state first."""

    @jax.jit
    def step(params, state, i):
        with jax.numpy_dtype_promotion("standard" if standard else "strict"):
            updates, state = tx.update(gradient(params, i), state, params)
            return optax.apply_updates(params, updates), state

    with jax.numpy_dtype_promotion("standard" if standard else "strict"):
        state = tx.init(params)
    history = []
    for i in range(steps):
        if change is not None:
            state = change(state, i)
        params, state = step(params, state, jnp.int32(i))
        history.append(dict(getattr(state, "hyperparams", {})))
    return params, state, history


def assert_close(ours, oracle, rtol=1e-6):
    differences = relative_difference(ours, oracle)
    assert max(differences.values()) <= rtol, differences


def assert_same_hyperparams(ours, oracle):
    assert sorted(ours) == sorted(oracle)
    for name in oracle:
        assert ours[name].dtype == oracle[name].dtype, name
        np.testing.assert_array_equal(ours[name], oracle[name], err_msg=name)


@pytest.mark.parametrize(
    "factory, args",
    [
        ("adam", dict(learning_rate=1e-2)),  # optax's betas: float32 in both
        ("adam", dict(learning_rate=3e-3, b1=0.8, b2=0.99, eps=1e-6)),
        ("sgd", dict(learning_rate=0.1, momentum=0.9, nesterov=True)),
        ("adamw", dict(learning_rate=1e-2, weight_decay=0.1)),
    ],
    ids=["adam", "adam_args", "sgd_nesterov", "adamw"],
)
def test_matches_optax_inject_hyperparams(factory, args):
    ours = shardopt.inject_hyperparams(getattr(shardopt, factory))(**args)
    oracle = optax.inject_hyperparams(getattr(optax, factory))(**args)
    params, state, history = run(ours, float32_params())
    oracle_params, oracle_state, oracle_history = run(
        oracle, float32_params(), standard=True
    )
    assert_close(params, oracle_params)
    assert int(state.count) == int(oracle_state.count) == STEPS
    for got, want in zip(history, oracle_history, strict=True):
        assert_same_hyperparams(got, want)
    assert isinstance(state, shardopt.InjectHyperparamsState)


def test_schedules_are_read_at_the_count():
    make = lambda lib: (
        optax.inject_hyperparams(optax.adam)
        if lib is optax
        else (shardopt.inject_hyperparams(shardopt.adam))
    )
    schedule = lambda lib: lib.cosine_onecycle_schedule(10, 1e-2)
    momentum = lambda lib: lib.linear_schedule(0.5, 0.875, 6)
    ours = make(shardopt)(schedule(shardopt), b1=momentum(shardopt))
    oracle = make(optax)(schedule(optax), b1=momentum(optax))
    params, _, history = run(ours, float32_params())
    oracle_params, _, oracle_history = run(oracle, float32_params(), standard=True)
    assert_close(params, oracle_params)
    for i, (got, want) in enumerate(zip(history, oracle_history, strict=True)):
        assert_same_hyperparams(got, want)
        # the state holds the values of the step just taken: the count before it
        want_rate = shardopt.cosine_onecycle_schedule(10, 1e-2)(jnp.int32(i))
        np.testing.assert_allclose(got["learning_rate"], want_rate, rtol=1e-5)


def test_changing_a_hyperparameter_in_the_state_as_optax_users_do():
    def halve_at_5(state, i):
        if i == 5:
            state.hyperparams["learning_rate"] = jnp.asarray(5e-3, jnp.float32)
            state.hyperparams["b2"] = jnp.asarray(0.95, jnp.float32)
        return state

    ours = shardopt.inject_hyperparams(shardopt.adam)(learning_rate=1e-2)
    oracle = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    params, state, history = run(ours, float32_params(), change=halve_at_5)
    oracle_params, _, oracle_history = run(
        oracle, float32_params(), standard=True, change=halve_at_5
    )
    assert_close(params, oracle_params)
    assert float(history[4]["learning_rate"]) == pytest.approx(1e-2)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(5e-3)
    for got, want in zip(history, oracle_history, strict=True):
        assert_same_hyperparams(got, want)
    # and nothing changed that was not asked: the plain float path matches too
    plain, _, _ = run(shardopt.adam(1e-2), float32_params(), steps=5)
    first, _, _ = run(ours, float32_params(), steps=5)
    assert_close(first, plain, rtol=1e-7)


def test_a_scheduled_entry_is_overwritten_by_its_schedule():
    tx = shardopt.inject_hyperparams(shardopt.sgd)(
        learning_rate=shardopt.warmup_constant_schedule(0.0, 1.0, 4)
    )
    params = float32_params()
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(123.0, jnp.float32)
    _, state = tx.update(gradient(params, 0), state, params)
    assert float(state.hyperparams["learning_rate"]) == 0.0


def test_jitted_update_does_not_recompile_when_a_hyperparameter_changes():
    traces = []
    tx = shardopt.inject_hyperparams(shardopt.adam)(learning_rate=1e-2)

    @jax.jit
    def step(params, state):
        traces.append(None)
        updates, state = tx.update(gradient(params, 0), state, params)
        return optax.apply_updates(params, updates), state

    params = make_params()
    state = tx.init(params)
    for i in range(6):
        params, state = step(params, state)
        lr = jnp.asarray(1e-2 / (i + 2), jnp.float32)
        state = eqx.tree_at(lambda s: s.hyperparams["learning_rate"], state, lr)
    assert len(traces) == 1
    # jax.jit(tx.update) directly, as optax code does
    update = jax.jit(tx.update)
    for i in range(3):
        state.hyperparams["b1"] = jnp.asarray(0.9 - 0.1 * i, jnp.float32)
        _, state = update(gradient(params, i), state, params)
    assert update._cache_size() == 1


def test_inside_an_optimizer_under_filter_jit():
    traces = []

    @eqx.filter_jit
    def step(params, opt, i):
        traces.append(None)
        return opt.step(params, gradient(params, i))

    tx = shardopt.inject_hyperparams(shardopt.adamw)(
        shardopt.linear_onecycle_schedule(20, 1e-2), weight_decay=0.05
    )
    params = make_params()
    opt = shardopt.Optimizer(tx, params)
    for i in range(4):
        params, opt = step(params, opt, jnp.int32(i))
        opt = eqx.tree_at(
            lambda o: o.state.hyperparams["weight_decay"],
            opt,
            jnp.asarray(0.1 * i, jnp.float32),
        )
    assert len(traces) == 1
    assert params["half"].dtype == jnp.bfloat16  # bfloat16 stays bfloat16
    moments = opt.state.inner_state[0]
    assert moments.mu["half"].dtype == moments.nu["half"].dtype == jnp.bfloat16


def test_mixed_tree_float32_leaves_match_optax():
    # optax's strongly typed float32 hyperparameters promote a bfloat16 leaf's
    # first moment and update to float32; shardopt keeps that leaf bfloat16
    # (cast at the leaf, as for a plain float), so only float32 leaves compare.
    ours = shardopt.inject_hyperparams(shardopt.adam)(learning_rate=1e-2)
    oracle = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    params, _, _ = run(ours, make_params())
    oracle_params, _, _ = run(oracle, make_params(), standard=True)
    float32 = [k for k in params if params[k].dtype == jnp.float32]
    assert_close(
        {k: params[k] for k in float32}, {k: oracle_params[k] for k in float32}
    )


def test_hyperparameter_dtypes():
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    state = shardopt.inject_hyperparams(shardopt.adam)(1e-2).init(params)
    with jax.numpy_dtype_promotion("standard"):
        oracle = optax.inject_hyperparams(optax.adam)(1e-2).init(params)
    assert_same_hyperparams(state.hyperparams, oracle.hyperparams)
    assert state.hyperparams["learning_rate"].dtype == jnp.bfloat16
    forced = shardopt.inject_hyperparams(shardopt.adam, hyperparam_dtype=jnp.float32)
    state = forced(1e-2).init(params)
    assert state.hyperparams["b1"].dtype == jnp.float32
    strong = shardopt.inject_hyperparams(shardopt.adam)(jnp.asarray(1e-2, jnp.float32))
    assert strong.init(params).hyperparams["learning_rate"].dtype == jnp.float32


def test_static_args_and_fixed_arguments():
    mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    tx = shardopt.inject_hyperparams(shardopt.adamw, static_args="mask")(
        1e-2, weight_decay=0.1, mask=mask
    )
    oracle = optax.inject_hyperparams(optax.adamw, static_args="mask")(
        1e-2, weight_decay=0.1, mask=mask
    )
    params, state, _ = run(tx, float32_params())
    oracle_params, oracle_state, _ = run(oracle, float32_params(), standard=True)
    assert_close(params, oracle_params)
    assert sorted(state.hyperparams) == sorted(oracle_state.hyperparams)
    # bools, None and dtypes stay fixed (not in the state)
    tx = shardopt.inject_hyperparams(shardopt.adam)(
        1e-2, mu_dtype=jnp.float32, nesterov=True
    )
    state = tx.init(float32_params())
    assert "mu_dtype" not in state.hyperparams
    assert "nesterov" not in state.hyperparams


def test_checkpoint_round_trip(tmp_path):
    make = lambda: shardopt.inject_hyperparams(shardopt.adam)(
        shardopt.cosine_onecycle_schedule(20, 1e-2)
    )
    params = make_params()
    opt = shardopt.Optimizer(make(), params)
    step = eqx.filter_jit(lambda p, o, i: o.step(p, gradient(p, i)))
    for i in range(3):
        params, opt = step(params, opt, jnp.int32(i))
    opt.state.hyperparams["b2"] = jnp.asarray(0.95, jnp.float32)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with shardopt.CheckpointManager(tmp_path) as manager:
        manager.save(3, params=params, opt=opt)
        manager.wait()
        got = manager.restore(params=abstract, opt=shardopt.Optimizer(make(), abstract))
    for a, b in zip(jax.tree.leaves(got.opt), jax.tree.leaves(opt), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(got.opt.state.hyperparams["b2"]) == pytest.approx(0.95)


def test_optax_factories_work_too():
    ours = shardopt.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    oracle = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    opt = shardopt.Optimizer(ours, float32_params())
    params = float32_params()
    for i in range(3):
        params, opt = opt.step(params, gradient(params, i))
    oracle_params, _, _ = run(oracle, float32_params(), steps=3, standard=True)
    assert_close(params, oracle_params)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (
            lambda: shardopt.inject_hyperparams(shardopt.adam)(1e-2, b1=1.5),
            ValueError,
            r"b1 must be in \[0, 1\), got 1.5",
        ),
        (
            lambda: shardopt.inject_hyperparams(shardopt.adam)(-1.0),
            ValueError,
            "learning_rate must be >= 0, got -1.0",
        ),
        (
            lambda: shardopt.inject_hyperparams(shardopt.adam, static_args="lr"),
            ValueError,
            "static_args must name arguments of inner_factory",
        ),
        (
            lambda: shardopt.inject_hyperparams(shardopt.adam)(1e-2, bogus=3),
            TypeError,
            "bogus",
        ),
        (lambda: shardopt.inject_hyperparams(3), TypeError, "inner_factory"),
    ],
)
def test_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_extra_arguments_reach_the_inner_transform():
    # reduce_on_plateau reads the loss; inject_hyperparams passes value= on
    ours = shardopt.inject_hyperparams(shardopt.reduce_on_plateau)(0.5, patience=1)
    oracle = optax.inject_hyperparams(optax.contrib.reduce_on_plateau)(0.5, patience=1)
    params = {"w": jnp.ones(3)}
    state = ours.init(params)
    with jax.numpy_dtype_promotion("standard"):
        oracle_state = oracle.init(params)
    update = jax.jit(ours.update)
    for loss in (3.0, 3.0, 3.0, 2.0, 2.0):
        _, state = update(params, state, params, value=jnp.float32(loss))
        with jax.numpy_dtype_promotion("standard"):
            _, oracle_state = oracle.update(
                params, oracle_state, params, value=jnp.float32(loss)
            )
        assert float(state.inner_state.scale) == float(oracle_state.inner_state.scale)
        assert_same_hyperparams(state.hyperparams, oracle_state.hyperparams)
    assert float(state.inner_state.scale) == 0.125
