"""Every new optimizer and every restore path hold leaves in buffers of their own.

Donating a tree whose leaves share a device buffer fails ("Attempt to donate the
same buffer twice"), and on several devices it has crashed the process. Each
test builds or restores, checks the buffers are distinct, then takes the
README's donated train step.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _ckpt_helpers import mesh
from conformance import ROWS, make_shardable_params

import shardopt
from shardopt.checkpoint import CheckpointManager, from_optax, restore_from_optax

SHAPES = {"w": (16, 8), "b": (8,), "s": ()}


def make_params():
    keys = jax.random.split(jax.random.key(3), len(SHAPES))
    return {
        name: jax.random.normal(key, shape)
        for key, (name, shape) in zip(keys, SHAPES.items(), strict=True)
    }


def loss(params, x):
    return jnp.sum(jnp.tanh(x @ params["w"] + params["b"]) ** 2) + params["s"] ** 2


@eqx.filter_jit(donate="all")
def train_step(params, opt, x):
    grads = jax.grad(loss)(params, x)
    return opt.step(params, grads)


def optax_tx():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))


def ours_tx():
    return shardopt.chain(shardopt.clip_by_global_norm(1.0), shardopt.adamw(1e-2))


def optax_trained(steps=3):
    params, tx = make_params(), optax_tx()
    with jax.numpy_dtype_promotion("standard"):  # optax needs it
        state = tx.init(params)
        for i in range(steps):
            grads = jax.grad(loss)(params, jnp.full((8, 16), 0.1 * (i + 1)))
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
    return params, state


def buffers(tree):
    return [
        (shard.device.id, shard.data.unsafe_buffer_pointer())
        for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array))
        for shard in leaf.addressable_shards
    ]


def assert_own_buffers_and_donatable(params, opt):
    owned = buffers((params, opt))
    assert len(owned) == len(set(owned)), "two leaves share a device buffer"
    x = jnp.ones((8, 16))
    if opt.plan is not None:
        x = jax.device_put(x, opt.plan.sharding(jax.sharding.PartitionSpec("data")))
    params, opt = train_step(params, opt, x)
    params, opt = train_step(params, opt, x)
    assert all(np.isfinite(np.asarray(v)).all() for v in params.values())


# inits that return a parameter or a hyperparameter itself: SAM's cache and
# DoG's initial parameters are the parameters; RMSProp's and Adagrad's first
# accumulator of a scalar parameter is their initial value, a hyperparameter;
# schedule-free's warmup schedule holds one array in several of its leaves
ALIASING_INITS = {
    "sam": lambda: shardopt.sam(shardopt.sgd(1e-2), shardopt.sgd(1e-2)),
    "dog": lambda: shardopt.scale_by_distance_over_gradients(global_scale=-1.0),
    "rmsprop": lambda: shardopt.rmsprop(1e-2),
    "adagrad": lambda: shardopt.adagrad(1e-1),
    "schedule_free": lambda: shardopt.schedule_free_sgd(0.1, warmup_steps=5),
}


@pytest.mark.parametrize("stage", [None, 1])
@pytest.mark.parametrize("name", ALIASING_INITS)
def test_a_new_optimizer_can_be_donated_whatever_its_init_returns(name, stage):
    params, plan = make_params(), None
    if stage is not None:
        plan = shardopt.zero(stage, mesh(8), min_size=0)
        params = plan.shard_params(params)
    opt = shardopt.Optimizer(ALIASING_INITS[name](), params, plan=plan)
    assert not set(buffers(params)) & set(buffers(opt)), "a parameter's buffer"
    assert_own_buffers_and_donatable(params, opt)


def test_every_tables_transform_inits_buffers_of_its_own():
    """The optax idiom (``state = tx.init(params)``, then a step donating the
    parameters and the state) needs a state sharing no buffer with the
    parameters, the transform or itself, as the Optimizer's does."""
    shared = {}
    for row in ROWS:
        tx = row.ours()
        if not isinstance(tx, shardopt.AbstractTransform):
            continue  # an optax transform: optax's init
        params = make_shardable_params()
        with jax.numpy_dtype_promotion("standard"):
            state = tx.init(params)
        seen = set(buffers((params, tx)))
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            eqx.filter(state, eqx.is_array)
        ):
            if seen.intersection(buffers(leaf)):
                shared.setdefault(row.name, []).append(jax.tree_util.keystr(path))
            seen.update(buffers(leaf))
    assert not shared, shared


def test_donating_an_optimizer_leaves_the_transform_it_was_built_from():
    tx = ours_tx()
    params = make_params()
    train_step(params, shardopt.Optimizer(tx, params), jnp.ones((8, 16)))
    # its hyperparameters are still the caller's: another optimizer from it
    assert not any(
        x.is_deleted() for x in jax.tree.leaves(eqx.filter(tx, eqx.is_array))
    )
    assert_own_buffers_and_donatable(
        make_params(), shardopt.Optimizer(tx, make_params())
    )


def test_from_optax_live_state():
    params, state = optax_trained()
    opt = from_optax(state, like=shardopt.Optimizer(ours_tx(), params))
    # the chain's three counts all come from optax's one count
    counts = [opt.state[0].count, opt.state[1][0].count, opt.count]
    assert len({int(c) for c in counts}) == 1
    assert_own_buffers_and_donatable(params, opt)


@pytest.mark.parametrize("devices", [1, 8])
def test_restore_from_optax_checkpoint(tmp_path, devices):
    params, state = optax_trained()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "c", {"params": params, "opt_state": state})
    plan = None
    like_params = params
    if devices > 1:
        plan = shardopt.zero(1, mesh(devices), min_size=0)
        like_params = plan.shard_params(params)
    like = shardopt.Optimizer(ours_tx(), like_params, plan=plan)
    got = restore_from_optax(tmp_path / "c", params=like_params, opt=like)
    assert_own_buffers_and_donatable(got.params, got.opt)


@pytest.mark.parametrize("target", ["concrete", "abstract", "keep_hyperparameters"])
def test_checkpoint_manager_restore(tmp_path, target):
    params = make_params()
    plan = shardopt.zero(1, mesh(8), min_size=0)
    params = plan.shard_params(params)
    opt = shardopt.Optimizer(ours_tx(), params, plan=plan)
    params, opt = train_step(params, opt, jnp.ones((8, 16)))
    with CheckpointManager(tmp_path) as manager:
        manager.save(1, params=params, opt=opt)
        manager.wait()
        if target == "abstract":
            like_params = plan.abstract_params(params)
            like_opt = shardopt.Optimizer(ours_tx(), like_params, plan=plan)
            got = manager.restore(params=like_params, opt=like_opt)
        else:
            got = manager.restore(
                params=params,
                opt=opt,
                keep_hyperparameters=target == "keep_hyperparameters",
            )
    assert_own_buffers_and_donatable(got.params, got.opt)
