"""The two libraries mix both ways: optax inside shardopt, shardopt inside optax.

optax transforms inside ``shardopt.chain``/``masked``/``Optimizer`` are rows of
the conformance table (so they are also run under every ZeRO stage); this file
adds optax's wrappers around shardopt transforms, the extra-arguments protocol,
and how the plan places optax state it cannot match.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import EXACT_B1, EXACT_B2, gradient, make_params
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt

STEPS = 6


def run_optax_style(tx, steps=STEPS):
    """optax's own loop: init, update, apply_updates, under jax.jit.

    float32 leaves only: optax.contrib.mechanize fails on bfloat16 leaves.
    """
    params = jax.tree.map(lambda x: x.astype(jnp.float32), make_params())

    @jax.jit
    def step_fn(params, state, step):
        updates, state = tx.update(gradient(params, step), state, params)
        return optax.apply_updates(params, updates), state

    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(params)
        for step in range(steps):
            params, state = step_fn(params, state, step)
    return params


def adam_pair():
    return (
        shardopt.adam(1e-2, EXACT_B1, EXACT_B2),
        optax.adam(1e-2, EXACT_B1, EXACT_B2),
    )


WRAPPERS = {
    "chain": lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx),
    "multi_steps": lambda tx: optax.MultiSteps(tx, every_k_schedule=2),
    "apply_if_finite": lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=2),
    "mechanize": lambda tx: optax.contrib.mechanize(tx),
    "schedule_free": lambda tx: optax.contrib.schedule_free(tx, learning_rate=1.0),
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_shardopt_transform_inside_optax(wrapper):
    ours, theirs = adam_pair()
    got = run_optax_style(WRAPPERS[wrapper](ours))
    want = run_optax_style(WRAPPERS[wrapper](theirs))
    for name in want:
        np.testing.assert_allclose(
            np.asarray(got[name], np.float32),
            np.asarray(want[name], np.float32),
            rtol=2e-6,
            atol=1e-7,
        )


class ScaleByValue(shardopt.AbstractTransform):
    """Multiply the updates by the ``value`` extra argument (a test transform)."""

    takes_extra_args = True

    def init(self, params):
        return shardopt.EmptyState()

    def update(self, grads, state, params=None, *, value):
        return jax.tree.map(lambda g: g * value.astype(g.dtype), grads), state


def optax_scale_by_value():
    def update(updates, state, params=None, *, value, **extra):
        del params, extra
        return jax.tree.map(lambda g: g * value.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


@pytest.mark.parametrize("make", [ScaleByValue, optax_scale_by_value])
def test_extra_arguments_reach_the_transforms_that_take_them(make):
    params = {"w": jnp.ones((3,))}
    grads = {"w": jnp.full((3,), 2.0)}
    tx = shardopt.chain(
        shardopt.masked(make(), {"w": True}), optax.scale(-1.0), shardopt.scale(0.5)
    )
    opt = shardopt.Optimizer(tx, params)
    step = jax.jit(lambda p, o, g, v: o.step(p, g, value=v))
    new, _ = step(params, opt, grads, jnp.float32(3.0))
    np.testing.assert_array_equal(new["w"], 1.0 - 3.0 * 2.0 * 0.5)


def mesh8():
    return Mesh(np.array(jax.devices()), ("data",))


def sharded_params(plan):
    keys = jax.random.split(jax.random.key(0), 2)
    params = {
        "w": jax.random.normal(keys[0], (16, 8)),
        "b": jax.random.normal(keys[1], (8,)),
    }
    return plan.shard_params(params)


def test_optax_state_is_partitioned_like_shardopts():
    plan = shardopt.zero(1, mesh8(), min_size=0)
    params = sharded_params(plan)
    theirs = shardopt.Optimizer(optax.adam(1e-2), params, plan=plan)
    ours = shardopt.Optimizer(shardopt.adam(1e-2), params, plan=plan)
    for name in params:
        want = ours.state[0].mu[name].sharding
        assert theirs.state[0].mu[name].sharding == want
        assert theirs.state[0].nu[name].sharding == want
        assert want.spec[0] == "data"

    def moment_bytes(opt):
        rows = plan.memory_report(params, opt).per_leaf()
        return {path: n for (_, path), n in rows.items() if ".mu" in path}

    assert moment_bytes(theirs) == moment_bytes(ours)


def test_unmatched_optax_state_is_replicated_and_reported():
    # optax.flatten keeps its moments as one vector of every parameter: no
    # parameter's path or shape, so the plan cannot partition it.
    plan = shardopt.zero(1, mesh8(), min_size=0)
    params = sharded_params(plan)
    opt = shardopt.Optimizer(optax.flatten(optax.adam(1e-2)), params, plan=plan)
    assert opt.state[0].mu.sharding == NamedSharding(plan.mesh, P())
    notes = {
        row.path: row.note
        for row in plan.memory_report(params, opt).leaves
        if row.role == "state"
    }
    assert "matches no parameter" in notes["[0].mu"]
    assert notes["[0].count"] is None  # scalars are replicated without comment
    strict = shardopt.zero(1, mesh8(), min_size=0, strict=True)
    with pytest.raises(ValueError, match=r"state leaf at \[0\]\.mu \(float32\[136\]\)"):
        shardopt.Optimizer(optax.flatten(optax.adam(1e-2)), params, plan=strict)
