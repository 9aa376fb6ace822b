"""Host offload of optimizer state: where the state lives, that the numbers do not
change, exact bytes per memory, checkpoints, and the error without host memory."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt import sharding as sh
from shardopt.sharding import _offload

SHAPES = {"w1": (32, 16), "b1": (16,), "w2": (16, 8), "s": (3,)}
HOST = "pinned_host"


def make_params():
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    return {
        k: jax.random.normal(key, shape) / 4
        for key, (k, shape) in zip(keys, SHAPES.items(), strict=True)
    }


def make_batch(i, mesh):
    kx, ky = jax.random.split(jax.random.key(100 + i))
    batch = jax.random.normal(kx, (16, 32)), jax.random.normal(ky, (16, 8))
    return [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in batch]


def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    out = jnp.matmul(h, p["w2"], out_sharding=P())
    return jnp.mean((out - y) ** 2) + jnp.sum(p["s"] ** 2)


@functools.cache
def mesh_of(kind):
    if kind == "explicit":
        return jax.make_mesh((8,), ("data",))
    return Mesh(np.array(jax.devices()), ("data",))


def setup(stage, offload, kind="auto", state_bits=None, min_size=0):
    plan = shardopt.zero(stage, mesh_of(kind), min_size=min_size, offload_state=offload)
    params = plan.shard_params(make_params())
    tx = shardopt.adamw(1e-2, weight_decay=1e-2)
    if state_bits == 8:  # these leaves are below adamw(state_bits=8)'s min_size
        tx = shardopt.quantize_state(tx, block_size=8, min_size=16)
    return params, shardopt.Optimizer(tx, params, plan=plan)


def step_fn(batch, params, opt):
    value, grads = opt.plan.value_and_grad(loss)(params, *batch)
    params, opt = opt.step(params, grads)
    return value, params, opt


train_step = eqx.filter_jit(step_fn, donate="all-except-first")
# Explicit axes: jax 0.10.2 aliases donated buffers across memories when a jit
# output has no memory kind (eqx.filter_jit's marker), see docs/offload.md
train_step_kept = eqx.filter_jit(step_fn)


def run(stage, offload, kind="auto", state_bits=None, steps=4):
    params, opt = setup(stage, offload, kind, state_bits)
    mesh = mesh_of(kind)
    step = train_step if kind == "auto" else train_step_kept
    for i in range(steps):
        _, params, opt = step(make_batch(i, mesh), params, opt)
    return params, opt


def memory_kinds(tree):
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ numbers
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_offloaded_state_lives_on_host_and_gives_bitwise_the_same_numbers(stage):
    _, fresh = setup(stage, True)
    assert fresh.plan.state_memory_kind == HOST
    assert memory_kinds(fresh.state) == {HOST}  # initialised straight into it
    params, opt = run(stage, offload=True)
    ref_params, ref_opt = run(stage, offload=False)
    assert memory_kinds(opt.state) == {HOST}  # written back after each step
    assert memory_kinds(ref_opt.state) == {"device"}
    assert opt.count.sharding.memory_kind == "device"
    assert memory_kinds(params) == {"device"}
    assert int(opt.count) == 4
    assert_bitwise_equal(params, ref_params)
    assert_bitwise_equal(opt.state, ref_opt.state)
    for off, on in zip(
        jax.tree.leaves(ref_opt.state), jax.tree.leaves(opt.state), strict=True
    ):  # the same layout, another memory
        assert on.sharding.memory_kind == HOST
        assert on.sharding.is_equivalent_to(
            off.sharding.with_memory_kind(HOST), on.ndim
        )


def test_explicit_mesh_offloads_alike():
    params, opt = run(1, offload=True, kind="explicit")
    ref_params, ref_opt = run(1, offload=False, kind="explicit")
    assert memory_kinds(opt.state) == {HOST}
    assert_bitwise_equal(params, ref_params)
    assert_bitwise_equal(opt.state, ref_opt.state)


def test_8_bit_state_offloads_alike():
    params, opt = run(1, offload=True, state_bits=8)
    ref_params, ref_opt = run(1, offload=False, state_bits=8)
    codes = opt.state[0].mu["w1"].codes
    assert codes.dtype == jnp.uint8 and codes.sharding.memory_kind == HOST
    assert memory_kinds(opt.state) == {HOST}
    assert_bitwise_equal(params, ref_params)
    assert_bitwise_equal(opt.state, ref_opt.state)


def test_stage0_on_one_device_without_jit():
    """No partitioning at all: a one-device mesh, eager steps."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    plan = shardopt.zero(0, mesh, offload_state=True)
    params = plan.shard_params(make_params())
    opt = shardopt.Optimizer(shardopt.adam(1e-2), params, plan=plan)
    ref_params = make_params()
    ref_opt = shardopt.Optimizer(shardopt.adam(1e-2), ref_params)
    for i in range(3):
        grads = jax.tree.map(lambda x, i=i: jnp.cos(x + i), ref_params)
        params, opt = opt.step(params, grads)
        ref_params, ref_opt = ref_opt.step(ref_params, grads)
    assert memory_kinds(opt.state) == {HOST}
    assert_bitwise_equal(params, ref_params)
    assert_bitwise_equal(opt.state, ref_opt.state)


# ------------------------------------------------------------------- memory
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_memory_report_gives_device_and_host_bytes_exactly(stage):
    params, opt = run(stage, offload=True, steps=1)
    mesh = mesh_of("auto")
    predicted = opt.plan.memory_report(params, opt)
    measured = sh.measure_memory(mesh, params=params, opt=opt)
    # measured: each live array's memory kind and its addressable shards' bytes
    live = {}
    for path, x in jax.tree_util.tree_flatten_with_path(opt.state)[0]:
        per = [0] * 8
        for shard in x.addressable_shards:
            per[shard.device.id] += shard.data.nbytes
        live[jax.tree_util.keystr(path)] = (x.sharding.memory_kind, tuple(per))
    for leaf in measured.leaves:
        if leaf.role == "state" and leaf.path != ".count":
            assert (leaf.memory_kind, leaf.per_device) == live[leaf.path]
    # the prediction, from shapes alone, agrees leaf by leaf and memory by memory
    kinds = lambda report: {
        (leaf.role, leaf.path): leaf.memory_kind for leaf in report.leaves
    }
    state_rows = lambda report: {
        k: v for k, v in report.per_leaf().items() if k[0] != "grads"
    }
    assert kinds(measured).items() <= kinds(predicted).items()
    assert state_rows(predicted) == state_rows(measured)
    for memory in ("device", "host"):
        for role in ("params", "state"):
            got = measured.totals(memory)[role]
            assert predicted.totals(memory)[role] == got
    # w1 2048 B, b1 64, w2 512, s 12 (float32) on 8 devices; two moments, three
    # int32 counts in the state (host), the optimizer's own count on device
    moments = {0: 2636, 1: 340, 3: 340}[stage]
    params_bytes = {0: 2636, 1: 2636, 3: 340}[stage]
    grads_bytes = {0: 2636, 1: 2636, 3: 340}[stage]
    host = 2 * moments + 12
    assert predicted.totals("host")["state"] == (host,) * 8
    assert predicted.totals("device")["state"] == (4,) * 8
    assert predicted.memory_totals() == {
        "device": (params_bytes + grads_bytes + 4,) * 8,
        "host": (host,) * 8,
    }
    assert predicted.totals()["state"] == (host + 4,) * 8  # all memories
    table = predicted.table()
    assert f"host memory    total per device: {host:,} bytes" in table
    assert "pinned_host" in table


def test_report_without_offload_has_no_host_bytes_or_column():
    params, opt = setup(1, False)
    report = opt.plan.memory_report(params, opt)
    assert report.memory_totals()["host"] == (0,) * 8
    assert report.memory_totals()["device"] == tuple(
        sum(report.totals()[r][i] for r in ("params", "grads", "state"))
        for i in range(8)
    )
    assert "memory" not in report.table()
    with pytest.raises(ValueError, match="memory must be 'device' or 'host'"):
        report.totals("pinned")


# ------------------------------------------------------------------- errors
def test_memory_kind_the_device_lacks_is_named():
    with pytest.raises(ValueError) as err:
        shardopt.zero(1, mesh_of("auto"), offload_state="hbm")
    message = str(err.value)
    assert "memory kind 'hbm'" in message
    assert "device cpu:0" in message
    assert "'device', 'pinned_host', 'unpinned_host'" in message


def test_backend_without_host_memory_fails_at_plan_time(monkeypatch):
    """What a backend with no pinned_host memory gives (seen through the one
    function that asks a device for its memories)."""
    monkeypatch.setattr(_offload, "memory_kinds", lambda device: ("device",))
    with pytest.raises(ValueError, match="memory kind 'pinned_host'") as err:
        shardopt.zero(0, mesh_of("auto"), offload_state=True)
    assert "can address are 'device'" in str(err.value)
    shardopt.zero(0, mesh_of("auto"))  # without offload: fine


def test_offload_state_of_another_type_is_refused():
    with pytest.raises(TypeError, match="offload_state must be True, False"):
        shardopt.zero(0, mesh_of("auto"), offload_state=1)


# -------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("state_bits", [None, 8])
def test_checkpoint_round_trip_onto_plans_with_and_without_offload(
    tmp_path, state_bits
):
    saved = {}
    for offload in (True, False):
        saved[offload] = run(1, offload, state_bits=state_bits, steps=2)
    with shardopt.CheckpointManager(tmp_path) as ckpt:
        for offload, (params, opt) in saved.items():
            ckpt.save(int(offload), params=params, opt=opt)
        ckpt.wait()
        for step in (0, 1):
            want_params, want_opt = saved[bool(step)]
            for offload in (True, False):
                target_params, target_opt = setup(1, offload, state_bits=state_bits)
                got = ckpt.restore(step, params=target_params, opt=target_opt)
                kind = HOST if offload else "device"
                assert memory_kinds(got.opt.state) == {kind}
                assert_bitwise_equal(got.opt.state, want_opt.state)
                assert_bitwise_equal(got.params, want_params)
                # and the restored optimizer steps on
                batch = make_batch(5, mesh_of("auto"))
                _, _, opt = train_step(batch, got.params, got.opt)
                assert memory_kinds(opt.state) == {kind}
