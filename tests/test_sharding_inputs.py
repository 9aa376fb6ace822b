"""ZeRO plans: hyperparameters on the mesh, bad input, factored state, and the
public per-device collectives in a user's own shard_map step."""

import functools
import re
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt import sharding as sh


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


# ------------------------------------------------------------------ bad input
def test_mesh_without_the_data_axis():
    mesh = mesh_of((8,), ("batch",), "auto")
    with pytest.raises(ValueError, match=r"no axis named 'data'.*\('batch',\)"):
        shardopt.zero(1, mesh)
    assert shardopt.zero(1, mesh, "batch").data_size == 8


def test_negative_bucket_bytes():
    mesh = mesh_of((8,), ("data",), "auto")
    with pytest.raises(ValueError, match="bucket_bytes must be >= 0, got -1"):
        shardopt.zero(2, mesh, bucket_bytes=-1)


def test_indivisible_data_axis_is_reported_or_raised_when_strict():
    mesh = mesh_of((8,), ("data",), "auto")
    params = {"odd": jnp.zeros((1001, 3)), "w": jnp.zeros((64, 32))}
    plan = shardopt.zero(1, mesh)
    layout = plan.layout(params)
    assert layout["['odd']"].dim is None
    assert layout["['odd']"].reason == "no unsharded dim is divisible by 8"
    report = plan.memory_report(params, shardopt.adam(1e-3))
    rows = [r for r in report.not_partitioned() if r.path.endswith("['odd']")]
    assert rows and {r.shape for r in rows} == {(1001, 3)}
    assert re.search(
        r"\['odd'\].*1001x3.*not partitioned: no unsharded dim", str(report)
    )
    strict = shardopt.zero(1, mesh, strict=True)
    with pytest.raises(ValueError) as err:
        strict.layout(params)
    message = str(err.value)
    for part in ("['odd']", "float32[1001,3]", "('data',)", "size 8", "divisible by 8"):
        assert part in message, (part, message)


def test_plan_bound_to_other_params():
    mesh = mesh_of((8,), ("data",), "auto")
    opt = shardopt.Optimizer(
        shardopt.adam(1e-3), {"w": jnp.zeros((64, 32))}, plan=shardopt.zero(1, mesh)
    )
    with pytest.raises(ValueError) as err:
        opt.plan.layout({"w": jnp.zeros((32, 64)), "v": jnp.zeros((8, 8))})
    message = str(err.value)
    assert "bound to other parameters" in message
    assert "['w']: the plan has (64, 32), the parameter is (32, 64)" in message
    assert "['v']: not in the plan" in message


@pytest.mark.parametrize("what", ["gradient", "parameter"])
def test_grads_or_params_on_another_mesh(what):
    mesh = mesh_of((8,), ("data",), "auto")
    other = Mesh(np.array(jax.devices()[::-1]), ("data",))
    params = params_on(mesh)
    plan = shardopt.zero(1, mesh, min_size=0)
    opt = shardopt.Optimizer(shardopt.adam(1e-3), params, plan=plan)
    grads = jax.tree.map(jnp.ones_like, params)
    moved = jax.device_put(
        params if what == "parameter" else grads, NamedSharding(other, P())
    )
    args = (moved, grads) if what == "parameter" else (params, moved)
    with pytest.raises(ValueError) as err:
        opt.step(*args)
    message = str(err.value)
    for part in (f"the {what} at ['b']", "float32[8]", "{'data': 8}", "devices [7, 6"):
        assert part in message, (part, message)


def test_stage_that_partitions_nothing_says_so():
    mesh = mesh_of((8,), ("data",), "auto")
    params = {"tiny": jnp.zeros((4, 4)), "odd": jnp.zeros((1001, 3))}
    with pytest.raises(ValueError) as err:
        shardopt.Optimizer(shardopt.adam(1e-3), params, plan=shardopt.zero(2, mesh))
    message = str(err.value)
    assert "ZeRO stage 2 on data axes ('data',) (size 8) partitioned none" in message
    assert "['tiny'] float32[4,4]: smaller than min_size=1024 elements" in message
    assert "['odd'] float32[1001,3]: no unsharded dim is divisible by 8" in message


# ------------------------------------------------------------ factored state
class RowColState(sh.FactoredState, eqx.Module):
    factored_dims: ClassVar = {
        "row": lambda ndim: tuple(range(ndim - 1)),  # drops the last dim
        "col": lambda ndim: (*range(ndim - 2), ndim - 1),  # drops dim -2
    }
    row: dict
    col: dict


class ScaleByRowCol(shardopt.AbstractTransform):
    """A tiny Adafactor-like test transform: grads / sqrt(row * col) statistics."""

    def init(self, params):
        row = jax.tree.map(lambda p: jnp.zeros(p.shape[:-1], p.dtype), params)
        col = jax.tree.map(
            lambda p: jnp.zeros((*p.shape[:-2], p.shape[-1]), p.dtype), params
        )
        return RowColState(row, col)

    def update(self, grads, state, params=None):
        sq = jax.tree.map(lambda g: g * g + 1e-30, grads)
        row = jax.tree.map(lambda s: jnp.mean(s, axis=-1), sq)
        col = jax.tree.map(lambda s: jnp.mean(s, axis=-2), sq)
        updates = jax.tree.map(
            lambda g, r, c: -g / jnp.sqrt(r[..., None] * c[..., None, :]),
            grads,
            row,
            col,
        )
        return updates, RowColState(row, col)


@pytest.mark.parametrize(
    ("shape", "names", "spec", "row", "col"),
    [
        # data on the dim row keeps; col drops it, so data moves onto col's dim
        ((8,), ("data",), P(), P("data"), P("data")),
        # tensor-parallel 'model' kept on col; data (4) on dim 0, kept by row
        ((4, 2), ("data", "model"), P(None, "model"), P("data"), P("model")),
    ],
)
def test_factored_state_follows_kept_dims(shape, names, spec, row, col):
    mesh = mesh_of(shape, names, "explicit")
    params = {"w": jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, spec))}
    plan = shardopt.zero(1, mesh, min_size=0)
    opt = shardopt.Optimizer(ScaleByRowCol(), params, plan=plan)
    assert opt.state.row["w"].sharding.spec == row
    assert opt.state.col["w"].sharding.spec == col
    kinds = {leaf.path: leaf.kind for leaf in plan.state_layout(opt.state, params)}
    assert set(kinds.values()) == {"factored"}
    grads = {"w": jnp.full((64, 32), 0.5)}
    params, opt = eqx.filter_jit(lambda p, o, g: o.step(p, g))(params, opt, grads)
    assert opt.state.row["w"].sharding.spec == row  # kept across steps
    # 0.5 / sqrt(0.25 * 0.25) = 2, so 1 - 2
    np.testing.assert_allclose(np.asarray(params["w"]), -1.0, atol=1e-6)


# ------------------------------------------------- user's own shard_map step
def test_public_collectives_in_a_users_shard_map_step():
    mesh = mesh_of((8,), ("data",), "auto")
    keys = jax.random.split(jax.random.key(3), 4)
    params = {
        "w": jax.random.normal(keys[0], (32, 16)),
        "v": jax.random.normal(keys[3], (16, 8)),
        "b": jnp.zeros((4,)),
    }
    x = jax.random.normal(keys[1], (16, 32))
    y = jax.random.normal(keys[2], (16, 16))
    # scatter w on dim 0 and v on dim 1, in one bucket; b is all-reduced
    dims = {"w": 0, "v": 1, "b": None}

    def loss(p, x, y):
        fit = jnp.mean((x @ p["w"] - y) ** 2) + jnp.mean(jnp.tanh(y @ p["v"]))
        return fit + jnp.sum(p["b"] ** 2)

    def local(p, x, y):
        p = jax.tree.map(lambda a: jax.lax.pcast(a, "data", to="varying"), p)
        g = jax.grad(loss)(p, x, y)  # this device's batch only
        mean = sh.all_reduce_mean(g, "data")
        scattered = sh.reduce_scatter_mean(g, "data", dims)
        gathered = sh.all_gather(scattered, "data", dims)
        return mean, scattered, gathered

    step = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            # all_gather's result is equal on every device but typed as varying:
            # stacked here, each device's copy checked below
            out_specs=(
                P(),
                {"w": P("data"), "v": P(None, "data"), "b": P()},
                {"w": P("data"), "v": P("data"), "b": P()},
            ),
        )
    )
    mean, scattered, gathered = step(params, x, y)
    want = jax.grad(loss)(params, x, y)
    for k, shape in (("w", (32, 16)), ("v", (16, 8))):
        for copy in np.asarray(gathered[k]).reshape(8, *shape):
            np.testing.assert_allclose(copy, want[k], rtol=1e-5, atol=1e-6)
    for got in (mean, scattered):
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert scattered["w"].sharding.shard_shape((32, 16)) == (4, 16)
    assert scattered["v"].sharding.shard_shape((16, 8)) == (16, 1)
    counts = sh.count_collectives(sh.compiled_text(step, params, x, y))
    assert counts.get("reduce-scatter") == 1  # w and v, one bucket
    assert counts.get("all-gather") == 2  # one per leaf
    assert counts.get("all-reduce", 0) >= 1  # the mean (XLA may combine them)


def test_collectives_parser_reads_long_tuples():
    hlo = (
        "%ar = (f32[2]{0}, f32[2]{0}, f32[2]{0}, f32[2]{0}, f32[2]{0}, "
        "/*index=5*/f32[3]{0}) all-reduce(%a, %b, %c, %d, %e, %f), "
        "replica_groups={{0,1}}, to_apply=%add"
    )
    (found,) = sh.collectives(hlo)
    assert found.kind == "all-reduce" and found.shapes[-1] == (3,)
