"""Flat buffers under a ZeRO plan: each device packs its own shards of the
leaves, so a fused step has the per-leaf step's collectives, every device holds
the per-leaf state's bytes, and the numbers are the per-leaf numbers."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conformance import BF16_RTOL, gradient
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt import sharding as sh
from shardopt._flat import AUTO_MIN_LEAVES, Packed
from shardopt.checkpoint import CheckpointManager
from shardopt.sharding._flat import ShardedFlatLayout

STEPS = 3
STAGES = (1, 2, 3)
# name -> (shape, axis names, tensor-parallel specs, axis kind); data axis "data"
MESHES = {
    "8": ((8,), ("data",), {}, "auto"),
    "4x2": (
        (4, 2),
        ("data", "model"),
        {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)},
        "explicit",
    ),
}
# "s" (3,) divides by no data size, so the plan keeps it whole, as it keeps b1
# whole on the 4x2 mesh's data axis; "h" is bfloat16 (a second buffer)
SHAPES = {"w1": (32, 16), "b1": (16,), "w2": (16, 8), "s": (3,), "h": (8, 8)}
# the trees the tests run on: all leaves (two buffers), float32 only (one)
TREES = {"mixed": tuple(SHAPES), "float32": ("w1", "b1", "w2", "s")}
TRANSFORMS = {
    "adam": shardopt.adam(1e-2),
    "adamw": shardopt.adamw(1e-2, weight_decay=1e-2),
    "sgd_momentum": shardopt.sgd(1e-2, momentum=0.9),
    "lion": shardopt.lion(1e-3),
    "rmsprop": shardopt.rmsprop(1e-2),
}


@functools.cache
def mesh_of(name: str) -> Mesh:
    shape, names, _, kind = MESHES[name]
    if kind == "explicit":
        return jax.make_mesh(shape, names)
    return Mesh(np.array(jax.devices()).reshape(shape), names)


def make_params(tree: str = "mixed") -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    return {
        name: (jax.random.normal(key, shape) / 4).astype(
            jnp.bfloat16 if name == "h" else jnp.float32
        )
        for key, (name, shape) in zip(keys, SHAPES.items(), strict=True)
        if name in TREES[tree]
    }


def plan_of(stage: int, mesh_name: str) -> shardopt.ShardingPlan:
    return shardopt.zero(stage, mesh_of(mesh_name), ("data",), min_size=0)


def build(transform, stage: int, mesh_name: str, fuse, tree: str = "mixed"):
    plan = plan_of(stage, mesh_name)
    specs = MESHES[mesh_name][2]
    params = plan.shard_params(make_params(tree), specs)
    return params, shardopt.Optimizer(transform, params, plan=plan, fuse=fuse)


TRACES = [0]


@functools.cache
def step_fn():
    """One jitted step for the whole module (a compilation per optimizer
    structure, shared by every test that runs one)."""

    @eqx.filter_jit
    def step(params, opt, i):
        TRACES[0] += 1  # Python side effect: runs once per compilation
        return opt.step(params, gradient(params, i))

    return step


@functools.cache
def run(name, stage, mesh_name, fuse, tree="mixed"):
    """``STEPS`` steps of ``name`` on ``tree``: under a plan, or
    (``stage=None``) on one device without one."""
    transform = TRANSFORMS[name]
    if stage is None:
        params = make_params(tree)
        opt = shardopt.Optimizer(transform, params, fuse=fuse)
    else:
        params, opt = build(transform, stage, mesh_name, fuse, tree)
    for i in range(STEPS):
        params, opt = step_fn()(params, opt, jnp.int32(i))
    return params, opt


def assert_bit_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# every transform at stage 2, two of them (one bias-corrected, one exact) at
# every stage: each case compiles two steps of its own, the suite's cost
PLAN_CASES = [(name, 2) for name in TRANSFORMS] + [
    (name, stage) for name in ("adam", "sgd_momentum") for stage in (1, 3)
]


@pytest.mark.parametrize(("name", "stage"), PLAN_CASES)
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_fused_equals_the_per_leaf_plan(name, stage, mesh_name):
    check_fused_equals_per_leaf(name, stage, mesh_name, "mixed")


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_stage_0_is_packed_and_exact_too(mesh_name, name="sgd_momentum"):
    # parameters in the state's layout (as at stage 3): summed in the buffers
    check_fused_equals_per_leaf(name, 0, mesh_name, "mixed")


def check_fused_equals_per_leaf(name, stage, mesh_name, tree):
    fused_params, fused = run(name, stage, mesh_name, True, tree)
    leaf_params, per_leaf = run(name, stage, mesh_name, False, tree)
    assert isinstance(fused.layout, ShardedFlatLayout) and per_leaf.layout is None
    assert int(fused.count) == int(per_leaf.count) == STEPS
    # the per-leaf view is laid out as the per-leaf state is
    for g, w in zip(
        jax.tree.leaves(fused.state), jax.tree.leaves(per_leaf.state), strict=True
    ):
        assert g.sharding.is_equivalent_to(w.sharding, g.ndim)
    assert_equal_or_rounding(name, fused_params, leaf_params)
    assert_equal_or_rounding(name, fused.state, per_leaf.state)


# Adam's bias correction, m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps), is not
# compiled alike in every program: XLA either multiplies by the scalar's
# reciprocal or rewrites (a / b) / c as a / (b * c), which rounds some elements
# otherwise (by an ulp). In the HLO inspected, the first came where the scalar
# 1 - b1^t had one use (a fused step with one buffer; a step on one device),
# the second where it had several (a per-leaf step under a plan, whose equal
# per-leaf scalars the SPMD partitioner merges). Which program gets which form
# is XLA's choice, so for these the tests ask for the conformance table's
# closeness (rounding), and bit equality of everything else.
BIAS_CORRECTED = ["adam", "adamw"]


def assert_trees_close(got, want):
    """Equal to rounding: the conformance table's tolerance for ZeRO columns."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
        rtol = BF16_RTOL if w.dtype == jnp.bfloat16 else 1e-6
        np.testing.assert_allclose(
            np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=1e-7
        )


def assert_equal_or_rounding(name, got, want):
    if name in BIAS_CORRECTED:
        assert_trees_close(got, want)
    else:
        assert_bit_equal(got, want)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("mesh_name", ["8"])
def test_fused_with_one_buffer_equals_the_per_leaf_plan(name, mesh_name):
    fused_params, fused = run(name, 2, mesh_name, True, "float32")
    leaf_params, per_leaf = run(name, 2, mesh_name, False, "float32")
    assert_equal_or_rounding(name, fused_params, leaf_params)
    assert_equal_or_rounding(name, fused.state, per_leaf.state)


ONE_DEVICE_CASES = [("mixed", "8"), ("mixed", "4x2"), ("float32", "8")]


@pytest.mark.parametrize(("tree", "mesh_name"), ONE_DEVICE_CASES)
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_fused_under_a_plan_equals_one_device(name, tree, mesh_name):
    fused_params, fused = run(name, 2, mesh_name, True, tree)
    one_params, one = run(name, None, None, False, tree)
    fused_state = jax.device_get(fused.state)
    assert_equal_or_rounding(name, jax.device_get(fused_params), one_params)
    assert_equal_or_rounding(name, fused_state, jax.device_get(one.state))


def test_no_recompilation_across_steps():
    params, opt = build(TRANSFORMS["adamw"], 2, "8", True)
    step = step_fn()
    params, opt = step(params, opt, jnp.int32(0))  # compiled (or cached) here
    before = TRACES[0]
    for i in range(1, 4):
        params, opt = step(params, opt, jnp.int32(i))
    assert TRACES[0] == before
    for buffer in jax.tree.leaves(opt.stored_state[0].mu):
        assert buffer.sharding == opt.layout.buffer_sharding()


def test_a_donated_jit_step_compiles_once_and_reuses_the_buffers():
    traces = [0]

    def train_step(params, opt, i):
        traces[0] += 1
        return opt.step(params, gradient(params, i))

    step = shardopt.jit_step(train_step, donate_argnums=(0, 1))
    params, opt = build(TRANSFORMS["adam"], 3, "4x2", True)
    for i in range(4):
        old = opt.stored_state[0].mu.buffers[0]
        params, opt = step(params, opt, jnp.int32(i))
        assert old.is_deleted()  # donated: its memory holds the new buffer
    assert traces[0] == 1
    want_params, want = run("adam", 3, "4x2", True)
    new_params, new = step(*build(TRANSFORMS["adam"], 3, "4x2", True), jnp.int32(0))
    for i in range(1, STEPS):
        new_params, new = step(new_params, new, jnp.int32(i))
    assert_bit_equal(new_params, want_params)
    assert_bit_equal(new.state, want.state)


# ------------------------------------------------------------ collectives
def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    out = jnp.matmul(h, p["w2"], out_sharding=P())
    return jnp.mean((out - y) ** 2) + jnp.sum(p["s"] ** 2)


@functools.cache
def train_step(plan: shardopt.ShardingPlan):
    value_and_grad = plan.value_and_grad(loss)

    @eqx.filter_jit
    def step(params, opt, x, y):
        _, grads = value_and_grad(params, x, y)
        return opt.step(params, grads)

    return step


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_a_fused_step_has_the_per_leaf_steps_collectives(stage, mesh_name):
    """Packing and unpacking are local: every all-reduce, reduce-scatter,
    all-gather, all-to-all and collective-permute of the step (gradients
    included) is the per-leaf step's."""
    mesh = mesh_of(mesh_name)
    batch = NamedSharding(mesh, P("data"))
    x = jax.device_put(jnp.ones((16, 32)), batch)
    y = jax.device_put(jnp.zeros((16, 8)), batch)
    counts = {}
    for fuse in (True, False):  # two buffers: float32 and bfloat16
        params, opt = build(TRANSFORMS["adamw"], stage, mesh_name, fuse)
        assert (opt.layout is not None) == fuse
        text = sh.compiled_text(train_step(opt.plan), params, opt, x, y)
        counts[fuse] = sh.count_collectives(text)
    assert counts[True] == counts[False]
    if stage == 2:  # the gradients' reduce-scatter is there in both
        assert counts[True]["reduce-scatter"] >= 1
    if stage < 3:  # the updates' all-gather back to the parameters' layout
        assert counts[True]["all-gather"] >= 1


# ---------------------------------------------------------------- bytes
# One device's part of each buffer, in elements: the float32 group (w1, b1,
# w2, s) and the bfloat16 group (h), as the plan shards the state per leaf.
PART_SIZES = {
    # 8 devices: w1 512/8, b1 16/8, w2 128/8, s 3 whole; h 64/8
    "8": (64 + 2 + 16 + 3, 8),
    # data 4 x model 2: w1 512/8, b1 16/2 (model only), w2 128/8, s 3; h 64/4
    "4x2": (64 + 8 + 16 + 3, 16),
}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_bytes_per_device_are_the_per_leaf_plans(stage, mesh_name):
    mesh = mesh_of(mesh_name)
    params, fused = build(TRANSFORMS["adam"], stage, mesh_name, True)
    _, per_leaf = build(TRANSFORMS["adam"], stage, mesh_name, False)
    assert fused.layout.part_sizes == PART_SIZES[mesh_name]
    assert fused.layout.sizes == tuple(8 * n for n in PART_SIZES[mesh_name])
    stored = sh.measure_memory(mesh, opt=fused).totals()["state"]
    assert stored == sh.measure_memory(mesh, opt=per_leaf).totals()["state"]
    # adam's mu and nu, float32 and bfloat16 parts, and two int32 counts
    f32, bf16 = PART_SIZES[mesh_name]
    assert stored == (2 * (4 * f32 + 2 * bf16) + 2 * 4 + 4,) * 8
    report = fused.plan.memory_report(params, fused)
    assert report.totals() == fused.plan.memory_report(params, per_leaf).totals()
    assert report.totals()["state"] == stored
    # the report's rows are the per-leaf state's, read without unpacking
    per_leaf_rows = per_leaf.plan.memory_report(params, per_leaf).per_leaf()
    assert report.per_leaf() == per_leaf_rows


# ------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_onto_another_mesh_and_stage(tmp_path):
    transform = TRANSFORMS["adamw"]
    params, saved = run("adamw", 2, "8", True)
    plan = plan_of(3, "4x2")
    abstract = plan.abstract_params(make_params(), MESHES["4x2"][2])
    like = shardopt.Optimizer(transform, abstract, plan=plan, fuse=True)
    assert isinstance(like.stored_state[0].mu, Packed)
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(STEPS, params=params, opt=saved)
        ckpt.wait()
        restored = ckpt.restore(params=abstract, opt=like)
        per_leaf_like = build(transform, 1, "8", False)[1]
        into_per_leaf = ckpt.restore(opt=per_leaf_like).opt
    opt = restored.opt
    assert opt.layout == like.layout and int(opt.count) == STEPS
    for buffer in jax.tree.leaves(opt.stored_state[0].mu):
        assert buffer.sharding == like.layout.buffer_sharding()
    assert_bit_equal(jax.device_get(opt.state), jax.device_get(saved.state))
    assert_bit_equal(jax.device_get(into_per_leaf.state), jax.device_get(saved.state))
    # one more step on the new mesh and stage gives the old one's numbers
    want, _ = step_fn()(params, saved, jnp.int32(STEPS))
    got, _ = step_fn()(restored.params, opt, jnp.int32(STEPS))
    assert_bit_equal(jax.device_get(got), jax.device_get(want))


def test_a_per_leaf_checkpoint_restores_into_a_fused_optimizer(tmp_path):
    params, saved = run("rmsprop", 1, "4x2", False)
    like = build(TRANSFORMS["rmsprop"], 1, "4x2", True)[1]
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(STEPS, params=params, opt=saved)
        ckpt.wait()
        restored = ckpt.restore(opt=like).opt
    assert isinstance(restored.layout, ShardedFlatLayout)
    assert_bit_equal(restored.state, saved.state)
    assert_bit_equal(restored.state, run("rmsprop", 1, "4x2", True)[1].state)


# ------------------------------------------------------------- the default
def _abstract_tree(n_leaves: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    replicated = NamedSharding(mesh, P())
    return {
        f"w{i:03d}": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=replicated)
        for i in range(n_leaves)
    }


def test_the_default_packs_under_a_plan_by_the_rule_without_one():
    mesh = mesh_of("8")
    plan = shardopt.zero(1, mesh, min_size=0)
    many, few = _abstract_tree(AUTO_MIN_LEAVES, mesh), _abstract_tree(3, mesh)
    adam = TRANSFORMS["adam"]
    default = shardopt.Optimizer(adam, many, plan=plan)
    assert isinstance(default.layout, ShardedFlatLayout)
    assert default.layout.n_leaves == AUTO_MIN_LEAVES
    assert default.layout.part_sizes == (AUTO_MIN_LEAVES * 3,)  # (1, 3) each
    buffer = default.stored_state[0].mu.buffers[0]
    assert buffer.shape == (8 * AUTO_MIN_LEAVES * 3,)
    assert buffer.sharding == default.layout.buffer_sharding()
    assert shardopt.Optimizer(adam, few, plan=plan).layout is None
    assert shardopt.Optimizer(adam, few, plan=plan, fuse=True).layout is not None
    assert shardopt.Optimizer(adam, many, plan=plan, fuse=False).layout is None
    clipped = shardopt.chain(shardopt.clip_by_global_norm(1.0), adam)
    assert shardopt.Optimizer(clipped, many, plan=plan, fuse=True).layout is None


def test_a_state_override_keeps_the_state_per_leaf():
    # a moment laid out otherwise than its parameter's mirror cannot share a
    # buffer part with the other moments: packing would not be exact
    mesh = mesh_of("8")
    few = _abstract_tree(3, mesh)
    plan = shardopt.zero(1, mesh, min_size=0, overrides={"[0].mu['w000']": P()})
    opt = shardopt.Optimizer(TRANSFORMS["adam"], few, plan=plan, fuse=True)
    assert opt.layout is None
    assert opt.state[0].mu["w000"].sharding.is_fully_replicated


def test_an_offloaded_state_stays_per_leaf():
    mesh = mesh_of("8")
    plan = shardopt.zero(1, mesh, min_size=0, offload_state=True)
    opt = shardopt.Optimizer(
        TRANSFORMS["adam"], _abstract_tree(3, mesh), plan=plan, fuse=True
    )
    assert opt.layout is None


def test_replace_state_packs_onto_the_plans_buffers():
    _, opt = build(TRANSFORMS["adam"], 3, "4x2", True)
    state = jax.tree.map(lambda x: x + 1, opt.state)
    new = opt.replace_state(state, jnp.int32(5))
    assert isinstance(new.stored_state[0].nu, Packed)
    for buffer in new.stored_state[0].nu.buffers:
        assert buffer.sharding == opt.layout.buffer_sharding()
    assert_bit_equal(new.state, state)
    assert "flat_buffers=2" in repr(new)
