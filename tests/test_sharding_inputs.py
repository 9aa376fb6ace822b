"""ZeRO plans: hyperparameters on the mesh, bad input, factored state, and the
public per-device collectives in a user's own shard_map step."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt


@functools.cache
def mesh_of(shape, names, kind):
    if kind == "explicit":
        return jax.make_mesh(shape, names)
    return Mesh(np.array(jax.devices()).reshape(shape), names)


def params_on(mesh, spec=None):
    keys = jax.random.split(jax.random.key(0), 2)
    params = {
        "w": jax.random.normal(keys[0], (16, 8)),
        "b": jax.random.normal(keys[1], (8,)),
    }
    return jax.device_put(params, NamedSharding(mesh, spec or P()))


def transform_with_schedule():
    schedule = shardopt.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=1e-2, warmup_steps=3, decay_steps=10
    )
    return shardopt.chain(
        shardopt.clip_by_global_norm(1.0), shardopt.adamw(schedule, weight_decay=1e-3)
    )


def assert_all_on_mesh(opt, mesh):
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(opt, eqx.is_array))[0]
    assert leaves
    for path, leaf in leaves:
        sharding = leaf.sharding
        assert isinstance(sharding, NamedSharding), (jax.tree_util.keystr(path), leaf)
        assert sharding.mesh == mesh, jax.tree_util.keystr(path)


# ------------------------------------------------- hyperparameters on the mesh
@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.parametrize("stage", [0, 2])
def test_every_array_leaf_is_on_the_plan_mesh(stage, kind):
    mesh = mesh_of((8,), ("data",), kind)
    params = params_on(mesh)
    plan = shardopt.zero(stage, mesh, min_size=0)
    opt = shardopt.Optimizer(transform_with_schedule(), params, plan=plan)
    assert_all_on_mesh(opt, mesh)  # transform (schedule numbers), state, count
    hyper = [x for x in jax.tree.leaves(opt.transform) if eqx.is_array(x)]
    assert hyper and all(x.sharding.is_fully_replicated for x in hyper)
    grads = jax.tree.map(jnp.ones_like, params)
    params, opt = eqx.filter_jit(lambda p, o, g: o.step(p, g))(params, opt, grads)
    assert_all_on_mesh(opt, mesh)
    opt = opt.with_hyperparameters(max_norm=2.0)
    assert_all_on_mesh(opt, mesh)
    # abstract optimizers carry the replicated sharding too (restore targets)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    aopt = shardopt.Optimizer(transform_with_schedule(), abstract, plan=plan)
    for leaf in jax.tree.leaves(aopt.transform):
        if eqx.is_array(leaf):
            assert leaf.sharding == plan.replicated()


def test_replicate_moves_committed_and_numpy_leaves():
    mesh = mesh_of((8,), ("data",), "auto")
    plan = shardopt.zero(1, mesh)
    on_dev3 = jax.device_put(jnp.float32(0.5), jax.devices()[3])
    got = plan.replicate({"a": on_dev3, "b": np.float32(2.0), "c": "name"})
    assert got["a"].sharding == plan.replicated() and float(got["a"]) == 0.5
    assert got["b"].sharding == plan.replicated() and float(got["b"]) == 2.0
    assert got["c"] == "name"
