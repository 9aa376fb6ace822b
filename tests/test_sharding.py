"""ZeRO plans: layouts, exact bytes per device, collectives per stage, equal numbers."""

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

STAGES = (0, 1, 2, 3)
# name -> (shape, axis names, data axes, tensor-parallel specs of the params)
MESHES = {
    "8": ((8,), ("data",), ("data",), {}),
    "4x2": (
        (4, 2),
        ("data", "model"),
        ("data",),
        {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)},
    ),
    "2x2x2": (
        (2, 2, 2),
        ("pod", "data", "model"),
        ("pod", "data"),
        {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)},
    ),
}
SHAPES = {"w1": (32, 16), "b1": (16,), "w2": (16, 8), "s": (3,)}


@functools.cache
def mesh_of(name, kind):
    shape, names, _, _ = MESHES[name]
    if kind == "explicit":
        return jax.make_mesh(shape, names)
    return Mesh(np.array(jax.devices()).reshape(shape), names)


def make_params():
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    return {
        k: jax.random.normal(key, shape) / 4
        for key, (k, shape) in zip(keys, SHAPES.items(), strict=True)
    }


def make_batch(i):
    kx, ky = jax.random.split(jax.random.key(100 + i))
    return jax.random.normal(kx, (16, 32)), jax.random.normal(ky, (16, 8))


def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    out = jnp.matmul(h, p["w2"], out_sharding=P())
    return jnp.mean((out - y) ** 2) + jnp.sum(p["s"] ** 2)


def loss_1dev(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - y) ** 2) + jnp.sum(p["s"] ** 2)


COMBOS = [("8", "auto"), ("4x2", "auto"), ("4x2", "explicit"), ("2x2x2", "explicit")]


TRANSFORM = shardopt.adamw(1e-2, weight_decay=1e-2)


def setup(stage, name, kind):
    mesh = mesh_of(name, kind)
    _, _, data_axes, specs = MESHES[name]
    plan = shardopt.zero(stage, mesh, data_axes, min_size=0)
    params = plan.shard_params(make_params(), specs)
    opt = shardopt.Optimizer(TRANSFORM, params, plan=plan)
    return mesh, plan, params, opt


@functools.cache
def train_step(stage, name, kind):
    """One jitted step per (stage, mesh), compiled once for this module."""
    _, _, _params, opt = setup(stage, name, kind)
    value_and_grad = opt.plan.value_and_grad(loss)

    @eqx.filter_jit
    def step(params, opt, x, y):
        value, grads = value_and_grad(params, x, y)
        params, opt = opt.step(params, grads)
        return value, params, opt

    return step


def batch_on(mesh, data_axes, i):
    spec = P(data_axes if len(data_axes) > 1 else data_axes[0])
    return [jax.device_put(a, NamedSharding(mesh, spec)) for a in make_batch(i)]


# ----------------------------------------------------------------- layouts
def test_stage1_layout_on_tensor_parallel_mesh():
    _, plan, params, _ = setup(1, "4x2", "auto")
    layout = plan.layout(params)
    assert layout["['w1']"].partitioned == P("data", "model")
    assert layout["['w2']"].partitioned == P("model", "data")
    assert layout["['b1']"].partitioned == P("model")  # 16 on model: no free dim
    assert layout["['b1']"].reason == "no unsharded dim is divisible by 4"
    assert layout["['s']"].reason == "no unsharded dim is divisible by 4"


def test_multi_axis_data_partition():
    _, plan, params, _ = setup(1, "2x2x2", "explicit")
    assert plan.data_size == 4
    assert plan.layout(params)["['w1']"].partitioned == P(("pod", "data"), "model")


def test_largest_divisible_dim_and_min_size():
    mesh = mesh_of("8", "auto")
    params = {"a": jnp.zeros((8, 64)), "b": jnp.zeros((12, 16)), "c": jnp.zeros(4)}
    layout = shardopt.zero(1, mesh, min_size=100).layout(params)
    assert layout["['a']"].partitioned == P(None, "data")
    assert layout["['b']"].partitioned == P(None, "data")
    assert layout["['c']"].reason == "smaller than min_size=100 elements"


def test_overrides():
    mesh = mesh_of("8", "auto")
    params = {"a": jnp.zeros((8, 64))}
    plan = shardopt.zero(1, mesh, overrides={"['a']": P("data", None)})
    opt = shardopt.Optimizer(TRANSFORM, params, plan=plan)
    assert opt.state[0].mu["a"].sharding.spec == P("data", None)


# --------------------------------------------------- abstract optimizers
@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.parametrize("stage", [0, 3])
def test_abstract_optimizer_carries_shardings(stage, kind):
    _mesh, plan, params, opt = setup(stage, "4x2", kind)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    aopt = shardopt.Optimizer(TRANSFORM, abstract, plan=plan)
    state = (aopt.state, aopt.count)
    assert not jax.tree.leaves(eqx.filter(state, lambda x: isinstance(x, jax.Array)))
    abstract_state = [*jax.tree.leaves(aopt.state), aopt.count]
    concrete_state = [*jax.tree.leaves(opt.state), opt.count]
    for a, c in zip(abstract_state, concrete_state, strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert a.shape == c.shape and a.dtype == c.dtype
        assert a.sharding.is_equivalent_to(c.sharding, len(a.shape))
    targets = opt.plan.abstract_params(params)
    for t, p in zip(jax.tree.leaves(targets), jax.tree.leaves(params), strict=True):
        assert t.sharding.is_equivalent_to(p.sharding, len(p.shape))


# ----------------------------------------------------------- memory
# Expected bytes per device (all devices equal here), by mesh and stage.
# 8:    w1 2048 B, b1 64, w2 512, s 12 (float32); data size 8; s stays whole.
# 4x2:  w1/b1/w2 halved by 'model'; data size 4; b1 and s never partitioned.
EXPECTED = {  # (params, grads, state incl. four int32 counts)
    ("8", 0): (2636, 2636, 2 * 2636 + 16),
    ("8", 1): (2636, 2636, 2 * 340 + 16),
    ("8", 2): (2636, 340, 2 * 340 + 16),
    ("8", 3): (340, 340, 2 * 340 + 16),
    ("4x2", 0): (1324, 1324, 2 * 1324 + 16),
    ("4x2", 1): (1324, 1324, 2 * 364 + 16),
    ("4x2", 2): (1324, 364, 2 * 364 + 16),
    ("4x2", 3): (364, 364, 2 * 364 + 16),
}


@pytest.mark.parametrize(("name", "kind"), COMBOS)
@pytest.mark.parametrize("stage", STAGES)
def test_memory_predicted_equals_measured(stage, name, kind):
    mesh, plan, params, opt = setup(stage, name, kind)
    predicted = opt.plan.memory_report(params, opt)
    grads = jax.device_put(params, opt.plan.grad_shardings(params))
    measured = sh.measure_memory(mesh, params=params, grads=grads, opt=opt)
    assert predicted.per_leaf() == measured.per_leaf()
    assert predicted.totals() == measured.totals()
    if (name, stage) in EXPECTED:
        got = tuple(predicted.totals()[r][0] for r in ("params", "grads", "state"))
        assert got == EXPECTED[name, stage]
    # the report predicts from shapes alone, before anything is allocated
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    assert plan.memory_report(abstract, TRANSFORM).totals() == predicted.totals()
    table = predicted.table()
    assert "total per device" in table
    if stage >= 1:
        assert "not partitioned" in table  # 's' (3,) is listed with its reason


# ------------------------------------------------ collectives and numbers
def _reference_params():
    """Stage 0 on one device, plain jax.grad: the numbers every stage must give."""
    params = make_params()
    opt = shardopt.Optimizer(TRANSFORM, params)

    @eqx.filter_jit
    def step(params, opt, x, y):
        grads = jax.grad(loss_1dev)(params, x, y)
        return opt.step(params, grads)

    for i in range(20):
        params, opt = step(params, opt, *make_batch(i))
    return params


REFERENCE = None


def reference():
    global REFERENCE
    if REFERENCE is None:
        REFERENCE = _reference_params()
    return REFERENCE


@pytest.mark.parametrize(("name", "kind"), COMBOS)
@pytest.mark.parametrize("stage", STAGES)
def test_collectives_per_stage(stage, name, kind):
    """The gradient path of each stage, counted in compiled HLO."""
    mesh, _, params, opt = setup(stage, name, kind)
    x, y = batch_on(mesh, MESHES[name][2], 0)
    value_and_grad = eqx.filter_jit(opt.plan.value_and_grad(loss))
    found = sh.collectives(sh.compiled_text(value_and_grad, params, x, y))
    kinds = [c.kind for c in found]
    layout = opt.plan.layout(params)
    partitioned = [leaf for leaf in layout.values() if leaf.dim is not None]
    # per-device shapes of the partitioned gradients before the data reduction
    local = {
        NamedSharding(mesh, leaf.base).shard_shape(leaf.shape) for leaf in partitioned
    }
    grad_all_reduces = [
        c for c in found if c.kind == "all-reduce" and set(c.shapes) & local
    ]
    if stage < 2:
        assert "reduce-scatter" not in kinds
        assert grad_all_reduces  # data-parallel all-reduce of the gradients
    else:
        # one reduce-scatter per bucket, no all-reduce of a partitioned gradient
        assert kinds.count("reduce-scatter") == BUCKETS[name]
        assert not grad_all_reduces
    gathers = [c for c in found if c.kind == "all-gather"]
    if stage == 3:
        # parameters gathered explicitly before use (stage 0 numbers)
        assert len(gathers) >= len(partitioned)
    elif name == "8":
        assert not gathers
    if name == "8":
        want = {0: 1, 1: 1, 2: 0, 3: 0}[stage]  # 8: s and the loss share one
        assert len([c for c in found if c.kind == "all-reduce"]) >= want


# The partitioned gradients (all under the default bucket_bytes) share one
# reduce-scatter, except those sharded on "model" too, which go alone:
# 8: w1, b1, w2 in one bucket; 4x2 and 2x2x2: w1 and w2 alone (b1 is replicated).
BUCKETS = {"8": 1, "4x2": 2, "2x2x2": 2}


@pytest.mark.parametrize(
    ("bucket_bytes", "want"),
    # b1 is 64 bytes, w1 2048, w2 512, in this order: 1024 puts w1 alone and b1
    # with w2; 2623 fits b1 and w1, not w2; 2624 fits all three
    [(0, 3), (1024, 2), (2623, 2), (2624, 1)],
)
def test_bucket_bytes_sets_the_number_of_reduce_scatters(bucket_bytes, want):
    mesh = mesh_of("8", "auto")
    plan = shardopt.zero(3, mesh, min_size=0, bucket_bytes=bucket_bytes)
    params = plan.shard_params(make_params())
    opt = shardopt.Optimizer(TRANSFORM, params, plan=plan)
    x, y = batch_on(mesh, ("data",), 0)
    value_and_grad = eqx.filter_jit(opt.plan.value_and_grad(loss))
    text = sh.compiled_text(value_and_grad, params, x, y)
    counts = sh.count_collectives(text)
    assert counts["reduce-scatter"] == want
    # the parameters are gathered by GSPMD (a constraint), one per leaf
    assert counts["all-gather"] == 3


@pytest.mark.parametrize(("name", "kind"), [("8", "auto"), ("4x2", "explicit")])
def test_buckets_give_bitwise_the_numbers_of_one_collective_per_leaf(name, kind):
    """Packing moves bytes, not sums: each element is reduced as before."""
    mesh = mesh_of(name, kind)
    _, _, data_axes, specs = MESHES[name]
    x, y = batch_on(mesh, data_axes, 0)
    results = []
    for bucket_bytes in (0, 2**20):
        plan = shardopt.zero(3, mesh, data_axes, min_size=0, bucket_bytes=bucket_bytes)
        params = plan.shard_params(make_params(), specs)
        opt = shardopt.Optimizer(TRANSFORM, params, plan=plan)
        value_and_grad = eqx.filter_jit(opt.plan.value_and_grad(loss))
        results.append(value_and_grad(params, x, y))
    (value_0, grads_0), (value_1, grads_1) = results
    assert np.asarray(value_0) == np.asarray(value_1)
    for key in SHAPES:
        assert grads_0[key].sharding == grads_1[key].sharding, key
        np.testing.assert_array_equal(
            np.asarray(grads_0[key]), np.asarray(grads_1[key])
        )


@pytest.mark.parametrize(
    ("name", "kind"), [("8", "auto"), ("4x2", "explicit"), ("2x2x2", "auto")]
)
@pytest.mark.parametrize("stage", STAGES)
def test_twenty_steps_match_single_device_stage0(stage, name, kind):
    mesh, _, params, opt = setup(stage, name, kind)
    step = train_step(stage, name, kind)
    for i in range(20):
        x, y = batch_on(mesh, MESHES[name][2], i)
        _, params, opt = step(params, opt, x, y)
    for key, want in reference().items():
        got = np.asarray(params[key])
        # Gradients are means over data shards, summed in another order than
        # one device's mean: equal to rounding, not bitwise (see docs).
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6, atol=1e-7)
    want = opt.plan.layout(params)["['w1']"].partitioned
    got = opt.state[0].mu["w1"].sharding
    assert got.is_equivalent_to(NamedSharding(mesh, want), 2) or stage == 0


@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.parametrize("stage", [1, 3])
def test_same_grads_give_bitwise_equal_params(stage, kind):
    """Given the same gradients, every stage's update is bitwise stage 0's."""
    _mesh, _plan, params, opt = setup(stage, "4x2", kind)
    ref_params = make_params()
    ref_opt = shardopt.Optimizer(TRANSFORM, ref_params)
    step = eqx.filter_jit(lambda p, o, g: o.step(p, g))
    for i in range(5):
        grads = jax.grad(loss_1dev)(ref_params, *make_batch(i))
        ref_params, ref_opt = step(ref_params, ref_opt, grads)
        grads = opt.plan.constrain(grads, opt.plan.grad_shardings(params))
        params, opt = step(params, opt, grads)
    for key, want in ref_params.items():
        # Elementwise math, but XLA:CPU vectorises each shard shape on its own:
        # updates measured at most 1 ulp apart (atol: 1 ulp of lr=1e-2 steps).
        np.testing.assert_allclose(
            np.asarray(params[key]), np.asarray(want), rtol=1e-6, atol=1e-8
        )


# ------------------------------------------------------------ bfloat16 sums
def _bfloat16(tree):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)


@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.parametrize("stage", [1, 2])
def test_bfloat16_gradients_on_a_data_by_model_mesh(stage, kind):
    """XLA:CPU aborted the process compiling a bfloat16 all-reduce (stage 1)
    or reduce-scatter (stage 2) in a shard_map over the data axis of a data x
    model mesh; the sums are now written out in float32 on CPU."""
    mesh = mesh_of("4x2", kind)
    _, _, data_axes, specs = MESHES["4x2"]
    plan = shardopt.zero(stage, mesh, data_axes, min_size=0)
    params = plan.shard_params(_bfloat16(make_params()), specs)
    x, y = _bfloat16(batch_on(mesh, data_axes, 0))
    _, grads = eqx.filter_jit(plan.value_and_grad(loss))(params, x, y)
    want = jax.grad(loss_1dev)(_bfloat16(make_params()), *_bfloat16(make_batch(0)))
    for key in SHAPES:
        assert grads[key].dtype == jnp.bfloat16, key
        # bfloat16 forward and backward, summed over shards in another order
        np.testing.assert_allclose(
            np.asarray(grads[key], np.float32),
            np.asarray(want[key], np.float32),
            rtol=2**-5,
            atol=2**-9,
        )


def test_bfloat16_sums_are_xlas_own():
    """On a 1-D mesh, where XLA:CPU compiles bfloat16 collectives, the float32
    sums of all_reduce_mean and reduce_scatter_mean give its numbers bit for
    bit (it promotes them to float32 itself)."""
    mesh = mesh_of("8", "auto")
    keys = jax.random.split(jax.random.key(7), 2)
    tree = [jax.random.normal(k, (64, 24), jnp.bfloat16) * 9 for k in keys]
    tree = jax.device_put(tree, NamedSharding(mesh, P("data")))

    def on_shards(fn):
        return jax.jit(
            jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
        )

    ours = on_shards(
        lambda t: [
            *sh.all_reduce_mean(t, "data"),
            *sh.reduce_scatter_mean(t, "data", [0, 0]),  # one bucket of two
        ]
    )(tree)
    xlas = on_shards(
        lambda t: [
            *(jax.lax.psum(x, "data") / jnp.asarray(8, x.dtype) for x in t),
            *(
                jax.lax.psum_scatter(x, "data", tiled=True) / jnp.asarray(8, x.dtype)
                for x in t
            ),
        ]
    )(tree)
    for got, want in zip(ours, xlas, strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16)
        )


@pytest.mark.parametrize("stage", [2, 3])
def test_an_unbound_plan_reads_explicit_layouts_inside_jit(stage):
    """On Explicit axes a traced parameter's type carries its tensor-parallel
    layout: the plan given to ``zero`` works inside jit as the Optimizer's
    bound ``opt.plan`` does (it had read every layout as replicated and
    failed in the reduce-scatter's packing)."""
    mesh, plan, params, opt = setup(stage, "4x2", "explicit")
    x, y = batch_on(mesh, ("data",), 0)
    unbound = eqx.filter_jit(plan.value_and_grad(loss))(params, x, y)
    bound = eqx.filter_jit(opt.plan.value_and_grad(loss))(params, x, y)
    assert np.asarray(unbound[0]) == np.asarray(bound[0])
    for key in SHAPES:
        got, want = unbound[1][key], bound[1][key]
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), key
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
