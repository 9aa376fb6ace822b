"""Non-finite numbers: skipped steps keep every state under every ZeRO stage, and
debug_nans() names the first leaf and step where an update went non-finite."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import shardopt

MESH = Mesh(np.array(jax.devices()), ("data",))


def params():
    return {
        "w": jnp.arange(64.0, dtype=jnp.float32).reshape(16, 4) / 64,
        "b": jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32),
    }


def grads_of(p, scale, nan=False):
    g = jax.tree.map(lambda x: jnp.cos(x) * scale, p)
    if nan:
        g["w"] = g["w"].at[3, 1].set(jnp.nan)
    return g


def arrays(tree):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def bitwise(a, b):
    la, lb = arrays(a), arrays(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.tobytes() == y.tobytes()
        for x, y in zip(la, lb, strict=True)
    )


@eqx.filter_jit
def step(p, opt, g):
    return opt.step(p, g)


GUARDS = {
    "apply_if_finite": lambda: shardopt.apply_if_finite(shardopt.adam(1e-2), 5),
    "multisteps_skip_not_finite": lambda: shardopt.MultiSteps(
        shardopt.adam(1e-2), 2, should_skip_update_fn=shardopt.skip_not_finite
    ),
}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("guard", sorted(GUARDS))
def test_non_finite_step_leaves_state_untouched(stage, guard):
    plan = shardopt.zero(stage, MESH, min_size=0)
    p = plan.shard_params(params())
    opt = shardopt.Optimizer(GUARDS[guard](), p, plan=plan)
    for i in range(3):  # finite steps: the state moves
        p, opt = step(p, opt, grads_of(p, 0.1 * (i + 1)))
    before_p, before_state = p, opt.state
    p, opt = step(p, opt, grads_of(p, 0.5, nan=True))
    assert bitwise(p, before_p)
    if guard == "apply_if_finite":
        assert bitwise(opt.state.inner_state, before_state.inner_state)
        assert int(opt.state.notfinite_count) == 1
    else:
        kept = ("mini_step", "gradient_step", "inner_opt_state", "acc_grads")
        for name in kept:
            assert bitwise(getattr(opt.state, name), getattr(before_state, name)), name
        assert int(opt.state.skip_state["num_not_finite"]) == 1
    # and the next finite step goes on from there
    p2, _ = step(p, opt, grads_of(p, 0.1))
    assert all(np.isfinite(x).all() for x in arrays(p2))


def _plain_step(p, opt, g):
    return opt.step(p, g)


STEPPERS = {  # how the step runs: each must end in NonFiniteError
    "eager": lambda: _plain_step,
    "jax.jit": lambda: jax.jit(_plain_step),
    "eqx.filter_jit": lambda: eqx.filter_jit(_plain_step),
    "zero3 on 8 devices, filter_jit": lambda: eqx.filter_jit(_plain_step),
}


@pytest.mark.parametrize("how", sorted(STEPPERS))
def test_debug_nans_names_leaf_and_step(how):
    plan = shardopt.zero(3, MESH, min_size=0) if "zero3" in how else None
    p = plan.shard_params(params()) if plan else params()
    opt = shardopt.Optimizer(shardopt.adam(1e-2), p, plan=plan)
    for _ in range(2):
        p, opt = step(p, opt, grads_of(p, 0.1))
    run = STEPPERS[how]()  # traced inside the context: the check is compiled in
    with (
        pytest.raises(shardopt.NonFiniteError) as err,
        shardopt.debug_nans() as nans,  # raises as it exits, when traced
    ):
        out = run(p, opt, grads_of(p, 0.1, nan=True))
    assert type(err.value) is shardopt.NonFiniteError
    assert "at step 2 the update of ['w'] is not finite" in str(err.value)
    assert "gradient was already non-finite" in str(err.value)
    assert nans.first.step == 2 and nans.first.leaf == "['w']"
    if how != "eager":  # the traced step ran to its end; nothing left failed
        assert np.isnan(np.asarray(out[0]["w"])).any()
        jax.effects_barrier()


def test_debug_nans_check_raises_inside_the_block_and_only_once():
    p = params()
    opt = shardopt.Optimizer(shardopt.sgd(0.1), p)
    run = jax.jit(_plain_step)
    with shardopt.debug_nans() as nans:
        run(p, opt, grads_of(p, 0.1))
        nans.check()  # a finite step: nothing to raise
        run(p, opt, grads_of(p, 0.1, nan=True))
        bad = r"step 0 the update of \['w'\]"
        with pytest.raises(shardopt.NonFiniteError, match=bad):
            nans.check()
    # raised once: leaving the block after check() raised nothing more
    assert nans.first.leaf == "['w']"


def test_debug_nans_blames_the_optimizer_when_the_gradient_is_finite():
    p = params()
    # a schedule is not checked at construction: it yields eps = 0 at run time
    tx = shardopt.adam(1e-2, eps=shardopt.constant_schedule(0.0))
    opt = shardopt.Optimizer(tx, p)
    g = jax.tree.map(jnp.zeros_like, p)
    with shardopt.debug_nans(raise_error=False) as nans:
        p2, _ = jax.jit(lambda p, o, g: o.step(p, g))(p, opt, g)
    assert nans.first is not None and nans.first.gradient_finite
    assert nans.first.leaves == ["['b']", "['w']"] and nans.first.step == 0
    assert np.isnan(np.asarray(p2["w"])).all()
    # outside the context nothing is checked (and nothing raised)
    opt.step(p, g)
