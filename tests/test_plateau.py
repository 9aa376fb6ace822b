"""reduce_on_plateau against optax.contrib's, driven by the loss given as value=."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import BF16_RTOL, make_params, relative_difference
from jax.sharding import Mesh

import shardopt
from shardopt.checkpoint import CheckpointManager

# improving, then flat, a tiny improvement below rtol, flat, a drop, flat: every
# phase of the rule (improve, plateau, reduce, cooldown, min_scale) is reached.
LOSSES = (
    [5.0, 4.0, 3.0]
    + [3.0] * 8
    + [2.5, 2.5, 2.5, 2.4999]
    + [2.0] * 14
    + [1.9, 1.0]
    + [1.0] * 40
)
SETTINGS = [
    dict(),
    dict(factor=0.5, patience=3, rtol=1e-3, cooldown=2, accumulation_size=2),
    dict(factor=0.1, patience=2, rtol=0.0, atol=0.05, min_scale=0.02),
    dict(factor=0.3, patience=1, cooldown=4, accumulation_size=3, min_scale=1e-3),
]
STATE_FIELDS = (
    "count",
    "scale",
    "best_value",
    "plateau_count",
    "cooldown_count",
    "avg_value",
)


def loss_of(params, step):
    return jnp.float32(LOSSES[step])


def grads_of(params, step):
    shift = 0.1 * jnp.asarray(step).astype(jnp.float32)
    return jax.tree.map(
        lambda p: (0.5 * p.astype(jnp.float32) + shift).astype(p.dtype), params
    )


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(s) or "default")
def test_matches_optax_at_every_step(settings):
    ours = shardopt.Optimizer(
        shardopt.chain(shardopt.sgd(0.1), shardopt.reduce_on_plateau(**settings)),
        make_params(),
    )
    oracle = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(**settings))
    params = oracle_params = make_params()
    with jax.numpy_dtype_promotion("standard"):
        oracle_state = oracle.init(oracle_params)

    @eqx.filter_jit
    def step(params, opt, loss, i):
        return opt.step(params, grads_of(params, i), value=loss)

    @jax.jit
    def oracle_step(params, state, loss, i):
        with jax.numpy_dtype_promotion("standard"):
            updates, state = oracle.update(
                grads_of(params, i), state, params, value=loss
            )
            return optax.apply_updates(params, updates), state

    scales = []
    for i, loss in enumerate(LOSSES):
        params, ours = step(params, ours, jnp.float32(loss), jnp.int32(i))
        oracle_params, oracle_state = oracle_step(
            oracle_params, oracle_state, jnp.float32(loss), jnp.int32(i)
        )
        got, want = ours.state[1], oracle_state[1]
        for name in STATE_FIELDS:
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype, (i, name)
            np.testing.assert_array_equal(a, b, err_msg=f"step {i}: {name}")
        scales.append(float(got.scale))
        differences = relative_difference(params, oracle_params)
        for name, difference in differences.items():
            assert params[name].dtype == oracle_params[name].dtype
            bound = 1e-6 if params[name].dtype == jnp.float32 else BF16_RTOL
            assert difference <= bound, (i, differences)
    assert len(set(scales)) > 1, "the loss sequence never lowered the scale"


def test_state_dtypes_follow_the_parameters():
    state = shardopt.reduce_on_plateau().init(make_params())
    assert state.scale.dtype == jnp.bfloat16  # the lowest: never promotes an update
    assert state.best_value.dtype == state.avg_value.dtype == jnp.float32
    assert state.count.dtype == state.plateau_count.dtype == jnp.int32


def test_compiles_once_and_a_new_patience_does_not_recompile():
    traces = []

    @eqx.filter_jit
    def step(params, opt, loss):
        traces.append(None)
        return opt.step(params, jax.tree.map(jnp.ones_like, params), value=loss)

    params = make_params()
    opt = shardopt.Optimizer(shardopt.reduce_on_plateau(patience=2), params)
    for loss in LOSSES[:8]:
        _, opt = step(params, opt, jnp.float32(loss))
    opt = eqx.tree_at(lambda o: o.transform.patience, opt, jnp.int32(5))
    opt = opt.with_hyperparameters(factor=0.5)
    for loss in LOSSES[8:16]:
        _, opt = step(params, opt, jnp.float32(loss))
    assert len(traces) == 1


def test_state_survives_a_checkpoint(tmp_path):
    settings = SETTINGS[1]
    make = lambda: shardopt.chain(
        shardopt.adam(1e-2), shardopt.reduce_on_plateau(**settings)
    )
    params = make_params()
    opt = shardopt.Optimizer(make(), params)
    step = eqx.filter_jit(lambda p, o, loss, i: o.step(p, grads_of(p, i), value=loss))
    half = 27  # inside a cooldown, mid-window: every counter is non-trivial
    for i in range(half):
        params, opt = step(params, opt, jnp.float32(LOSSES[i]), jnp.int32(i))
    saved = opt.state[1]
    assert float(saved.scale) < 1 and int(saved.count) == 1
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with CheckpointManager(tmp_path) as manager:
        manager.save(half, params=params, opt=opt)
        manager.wait()
        got = manager.restore(params=abstract, opt=shardopt.Optimizer(make(), abstract))
    for name in STATE_FIELDS:
        np.testing.assert_array_equal(
            getattr(got.opt.state[1], name), getattr(saved, name)
        )
    # the restored run goes on exactly as the uninterrupted one
    a_params, a_opt, b_params, b_opt = params, opt, got.params, got.opt
    for i in range(half, len(LOSSES)):
        loss = jnp.float32(LOSSES[i])
        a_params, a_opt = step(a_params, a_opt, loss, jnp.int32(i))
        b_params, b_opt = step(b_params, b_opt, loss, jnp.int32(i))
    for a, b in zip(jax.tree.leaves(a_opt), jax.tree.leaves(b_opt), strict=True):
        np.testing.assert_array_equal(a, b)


def test_under_zero_stage_1_as_unsharded():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    plan = shardopt.zero(1, mesh, min_size=0)
    make = lambda: shardopt.chain(
        shardopt.adam(1e-2), shardopt.reduce_on_plateau(patience=1, factor=0.5)
    )
    params = {"w": jnp.ones((8, 3)), "b": jnp.zeros((3,))}
    sharded = shardopt.Optimizer(make(), plan.shard_params(params), plan=plan)
    plain = shardopt.Optimizer(make(), params)
    sp, pp = plan.shard_params(params), params
    step = eqx.filter_jit(lambda p, o, loss: o.step(p, grads_of(p, 0), value=loss))
    for loss in (3.0, 3.0, 3.0, 2.0):
        sp, sharded = step(sp, sharded, jnp.float32(loss))
        pp, plain = step(pp, plain, jnp.float32(loss))
    assert float(sharded.state[1].scale) == float(plain.state[1].scale) == 0.25
    for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(pp), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_needs_the_loss():
    opt = shardopt.Optimizer(shardopt.reduce_on_plateau(), make_params())
    with pytest.raises(TypeError, match="pass it as value="):
        opt.step(make_params(), make_params())


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(factor=1.0), ValueError, r"factor must be in \(0, 1\), got 1.0"),
        (dict(factor=0.0), ValueError, r"factor must be in \(0, 1\), got 0.0"),
        (dict(rtol=1.5), ValueError, r"rtol must be in \[0, 1\], got 1.5"),
        (dict(atol=-1.0), ValueError, "atol must be >= 0, got -1.0"),
        (
            dict(rtol=0.0, atol=0.0),
            ValueError,
            "at least one of rtol and atol must be > 0",
        ),
        (dict(patience=0), ValueError, "patience must be >= 1, got 0"),
        (dict(patience=2.5), ValueError, "patience must be an integer, got 2.5"),
        (dict(cooldown=-1), ValueError, "cooldown must be >= 0, got -1"),
        (dict(accumulation_size=0), ValueError, "accumulation_size must be >= 1"),
        (dict(min_scale=-0.1), ValueError, "min_scale must be >= 0, got -0.1"),
        (
            dict(factor=optax.constant_schedule(0.5)),
            TypeError,
            "factor must be a number, not a schedule",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        shardopt.reduce_on_plateau(**kwargs)
