"""Property-based tests (hypothesis): random trees, meshes, ZeRO stages, rows.

Trees have 1-3 leaves of random shapes (scalars and zero-size leaves included)
in float32, bfloat16 or float16; meshes have 1, 2, 4 or 8 devices, 1-D or 2-D,
with Auto or Explicit axes; stages are 0-3; the optimizers are rows of the
conformance table whose math is elementwise (so sharding cannot change a bit).
Examples are few and bounded (each one compiles), so the file runs in well
under a minute.
"""

from __future__ import annotations

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, reject, settings
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt import sharding as sh
from shardopt.checkpoint import CheckpointManager

SETTINGS = settings(
    max_examples=5,
    deadline=None,
    derandomize=True,  # recorded: the same examples every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ROWS = {  # elementwise rows of tests/rows_*.py
    "adam": lambda: shardopt.adam(1e-2),
    "adamw": lambda: shardopt.adamw(1e-2, weight_decay=1e-2),
    "sgd_momentum": lambda: shardopt.sgd(1e-2, momentum=0.9, nesterov=True),
    "lion": lambda: shardopt.lion(1e-3),
    "rmsprop": lambda: shardopt.rmsprop(1e-2, momentum=0.5),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SHAPES = st.sampled_from([(), (0,), (8,), (16, 4), (3, 5), (8, 0), (4, 8, 2)])


@st.composite
def trees(draw):
    n = draw(st.integers(1, 3))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    seed = draw(st.integers(0, 2**16))
    tree = {}
    for i in range(n):
        shape = draw(SHAPES)
        key = jax.random.fold_in(jax.random.key(seed), i)
        tree[f"p{i}"] = jax.random.normal(key, shape, jnp.float32).astype(dtype)
    if draw(st.booleans()):  # one level deeper
        tree = {"outer": tree, "scale": jnp.ones((), dtype)}
    return tree


@st.composite
def meshes(draw):
    """1, 2, 4 or 8 devices, 1-D or data x model, with Auto or Explicit axes."""
    n = draw(st.sampled_from([1, 2, 4, 8]))
    devices = np.array(jax.devices()[:n])
    if n >= 4 and draw(st.booleans()):
        shape, names = (n // 2, 2), ("data", "model")
    else:
        shape, names = (n,), ("data",)
    if draw(st.booleans()):
        return jax.make_mesh(shape, names, devices=devices.flat)  # Explicit
    return Mesh(devices.reshape(shape), names)


def bitwise(a, b) -> bool:
    la = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    return len(la) == len(lb) and all(
        x.shape == y.shape
        and x.dtype == y.dtype
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb, strict=True)
    )


def grads_for(params, i):
    return jax.tree.map(
        lambda p: (jnp.sin(p.astype(jnp.float32) + i)).astype(p.dtype), params
    )


def optimizer(transform, params, plan):
    try:
        return shardopt.Optimizer(transform, params, plan=plan)
    except ValueError as err:  # a stage >= 1 plan that would partition nothing
        reject() if "partitioned none" in str(err) else None
        raise


def run(params, transform, plan, steps=2):
    if plan is not None:
        params = plan.shard_params(params)
    opt = optimizer(transform, params, plan)
    for i in range(steps):
        params, opt = opt.step(params, grads_for(params, i))
    return params, opt


@SETTINGS
@given(
    tree=trees(),
    mesh=meshes(),
    stage=st.integers(0, 3),
    row=st.sampled_from(sorted(ROWS)),
)
def test_sharded_equals_unsharded(tree, mesh, stage, row):
    plan = shardopt.zero(stage, mesh, min_size=0)
    want_params, want_opt = run(tree, ROWS[row](), None)
    got_params, got_opt = run(tree, ROWS[row](), plan)
    assert bitwise(got_params, want_params)
    assert bitwise(got_opt.state, want_opt.state)


@SETTINGS
@given(
    tree=trees(),
    save_mesh=meshes(),
    load_mesh=meshes(),
    stages=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    row=st.sampled_from(sorted(ROWS)),
)
def test_save_restore_onto_another_mesh_round_trips(
    tree, save_mesh, load_mesh, stages, row, tmp_path_factory
):
    save_plan = shardopt.zero(stages[0], save_mesh, min_size=0)
    params, opt = run(tree, ROWS[row](), save_plan, steps=1)
    directory = tmp_path_factory.mktemp("prop")
    with CheckpointManager(directory) as ckpt:
        ckpt.save(1, params=params, opt=opt)
    load_plan = shardopt.zero(stages[1], load_mesh, min_size=0)
    like = load_plan.shard_params(jax.tree.map(jnp.zeros_like, tree))
    like_opt = optimizer(ROWS[row](), like, load_plan)
    got = CheckpointManager(directory).restore(params=like, opt=like_opt)
    assert bitwise(got.params, params) and bitwise(got.opt, opt)
    for x, want in zip(jax.tree.leaves(got.params), jax.tree.leaves(like), strict=True):
        assert x.sharding == want.sharding


@SETTINGS
@given(
    tree=trees(),
    mesh=meshes(),
    stage=st.integers(0, 3),
    row=st.sampled_from(sorted(ROWS)),
)
def test_memory_report_equals_measured_bytes(tree, mesh, stage, row):
    plan = shardopt.zero(stage, mesh, min_size=0)
    params, opt = run(tree, ROWS[row](), plan, steps=0)
    predicted = plan.memory_report(params, opt)
    grads = jax.device_put(params, plan.grad_shardings(params))
    measured = sh.measure_memory(mesh, params=params, grads=grads, opt=opt)
    assert predicted.per_leaf() == measured.per_leaf()
    assert predicted.totals() == measured.totals()


def squares(params, x):
    """Each shard's loss has gradient ``2 p`` (x is ones)."""
    total = sum(jnp.sum(p.astype(jnp.float32) ** 2) for p in jax.tree.leaves(params))
    return total * jnp.mean(x)


def sixteen_bits(x: jax.Array) -> jax.Array:
    """``x`` with at most 16 significant bits (float32: the last 8 cleared)."""
    if x.dtype != jnp.float32:
        return x  # bfloat16 has 8, float16 11
    bits = np.asarray(x).view(np.uint32) & np.uint32(0xFFFFFF00)
    return jnp.asarray(bits.view(np.float32))


@SETTINGS
@given(tree=trees(), mesh=meshes(), stage=st.integers(0, 3))
def test_plan_gradients_equal_one_devices(tree, mesh, stage):
    """``plan.value_and_grad`` (all-reduce or reduce-scatter, float16 and
    bfloat16 included, on 1-D and data x model meshes) gives one device's
    gradients bit for bit, in the plan's gradient layout. Every shard's
    gradient is the same ``2 p`` of at most 16 significant bits, so its sum
    over up to 8 shards is exact in a float32 accumulator (a float16 one
    rounds): the mean is ``2 p`` again."""
    tree = jax.tree.map(sixteen_bits, tree)
    plan = shardopt.zero(stage, mesh, min_size=0)
    params = plan.shard_params(tree)
    x = jax.device_put(jnp.ones((plan.data_size * 2,)), plan.sharding(P("data")))
    value_and_grad = eqx.filter_jit(plan.bind(params).value_and_grad(squares))
    value, grads = value_and_grad(params, x)
    want_value, want = jax.value_and_grad(squares)(tree, jnp.ones((2,)))
    np.testing.assert_allclose(np.asarray(value), np.asarray(want_value), rtol=1e-6)
    assert bitwise(grads, want)
    for got, layout in zip(
        jax.tree.leaves(grads),
        jax.tree.leaves(plan.grad_shardings(params)),
        strict=True,
    ):
        assert got.sharding.is_equivalent_to(layout, got.ndim)
