"""MultiSteps beyond the table: one large batch, a partitioned accumulator,
inside shard_map, rejected mini-steps, bad input."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt


def mesh8():
    return Mesh(np.array(jax.devices()), ("data",))


def make_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(k1, (16, 4)), "b": jax.random.normal(k2, (4,))}


def loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def batch(n=8):
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (n, 16)), jax.random.normal(ky, (n, 4))


def test_k_mini_batches_equal_one_large_batch():
    x, y = batch(8)
    step = eqx.filter_jit(lambda p, o, x, y: o.step(p, jax.grad(loss)(p, x, y)))
    big = make_params()
    big_opt = shardopt.Optimizer(shardopt.adam(1e-2), big)
    small = make_params()
    small_opt = shardopt.Optimizer(shardopt.MultiSteps(shardopt.adam(1e-2), 4), small)
    for _ in range(3):
        big, big_opt = step(big, big_opt, x, y)
        for i in range(4):
            small, small_opt = step(
                small, small_opt, x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2]
            )
        assert bool(small_opt.transform.has_updated(small_opt.state))
    for name in big:
        np.testing.assert_allclose(small[name], big[name], rtol=1e-6, atol=1e-7)


def test_the_accumulator_is_partitioned_by_the_plan():
    plan = shardopt.zero(1, mesh8(), min_size=0)
    params = plan.shard_params(make_params())
    opt = shardopt.Optimizer(
        shardopt.MultiSteps(shardopt.adam(1e-2), 4), params, plan=plan
    )
    acc = opt.state.acc_grads["w"]
    assert acc.sharding.is_equivalent_to(NamedSharding(plan.mesh, P("data")), 2)
    report = plan.memory_report(params, opt).per_leaf()
    assert max(report[("state", ".acc_grads['w']")]) == 16 * 4 * 4 // 8


def test_runs_inside_shard_map_on_per_device_shards():
    tx = shardopt.MultiSteps(shardopt.adam(1e-2), 2)
    params = make_params()
    state = tx.init(params)
    grads = [jax.grad(loss)(params, *batch(8)) for _ in range(1)] * 2

    def local(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return shardopt.apply_updates(params, updates), state

    # every leaf that mirrors a parameter is split over 'data' along dim 0
    def spec(x):
        return P("data") if x.ndim and x.shape[0] % 8 == 0 else P()

    state_specs = jax.tree.map(spec, state)
    param_specs = jax.tree.map(spec, params)
    sharded = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh8(),
            in_specs=(param_specs, state_specs, param_specs),
            out_specs=(param_specs, state_specs),
        )
    )
    want_params, want_state = params, state
    got_params, got_state = params, state
    for g in grads:
        want_params, want_state = local(g, want_state, want_params)
        got_params, got_state = sharded(g, got_state, got_params)
    for name in params:
        np.testing.assert_allclose(got_params[name], want_params[name], rtol=1e-6)
    assert int(got_state.gradient_step) == 1


def test_a_rejected_mini_step_leaves_the_state_untouched():
    def not_finite(updates, gradient_step, params):
        finite = jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)])
        )
        return jnp.logical_not(finite), ()

    tx = shardopt.MultiSteps(shardopt.adam(1e-2), 3, should_skip_update_fn=not_finite)
    params = make_params()
    state = tx.init(params)
    grads = jax.grad(loss)(params, *batch())
    update = jax.jit(tx.update)
    _, state = update(grads, state, params)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
    updates, after = update(bad, state, params)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(not jnp.any(u) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    ("k", "error", "message"),
    [
        (0, ValueError, "every_k_schedule must be >= 1, got 0"),
        (-2, ValueError, "every_k_schedule must be >= 1, got -2"),
        (1.5, TypeError, "every_k_schedule must be a positive int"),
    ],
)
def test_bad_every_k_schedule(k, error, message):
    with pytest.raises(error, match=message):
        shardopt.MultiSteps(shardopt.sgd(1e-2), k)


def test_bad_inner_transform():
    with pytest.raises(TypeError, match=r"MultiSteps' opt must be .* got str"):
        shardopt.MultiSteps("adam", 2)
