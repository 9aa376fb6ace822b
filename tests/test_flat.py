"""Flat buffers: an elementwise transform runs once per dtype's buffer, with the
very same numbers (bit for bit) as leaf by leaf, and everything that reads or
writes the state (checkpoints, optax interop, groups, memory) sees it per leaf."""

from __future__ import annotations

import functools
import operator
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import ROWS, gradient, make_shardable_params

import shardopt
from shardopt._flat import AUTO_MIN_LEAVES, CONCAT_WIDTH, FlatLayout, Packed
from shardopt.checkpoint import CheckpointManager, from_optax, to_optax
from shardopt.sharding import measure_memory

STEPS = 4


def _elementwise(row) -> bool:
    opt = shardopt.Optimizer(row.ours(), make_shardable_params(), fuse=True)
    return opt.layout is not None


FUSED = [row for row in ROWS if _elementwise(row)]


def test_the_common_optimizers_are_fused():
    names = {row.name for row in FUSED}
    assert {"sgd", "sgd_momentum", "adam", "adamw_schedule", "lion", "rmsprop"} <= names
    assert "optax_clip_in_shardopt_chain" not in names  # a global norm: not fused


@functools.cache
def _step():
    return eqx.filter_jit(lambda params, opt, i: opt.step(params, gradient(params, i)))


def _run(transform, fuse: bool):
    params = make_shardable_params()
    opt = shardopt.Optimizer(transform, params, fuse=fuse)
    for i in range(STEPS):
        params, opt = _step()(params, opt, jnp.int32(i))
    return params, opt


@pytest.mark.parametrize("row", FUSED, ids=[row.name for row in FUSED])
def test_fused_equals_per_leaf_bit_for_bit(row):
    transform = row.ours()
    fused_params, fused = _run(transform, True)
    leaf_params, per_leaf = _run(transform, False)
    assert fused.layout is not None and per_leaf.layout is None
    assert jax.tree.structure(fused.state) == jax.tree.structure(per_leaf.state)
    jax.tree.map(np.testing.assert_array_equal, fused_params, leaf_params)
    jax.tree.map(np.testing.assert_array_equal, fused.state, per_leaf.state)
    assert int(fused.count) == int(per_leaf.count) == STEPS


def _tree(n_leaves: int) -> dict[str, jax.Array]:
    return {f"w{i:03d}": jnp.full((2, 3), 0.1 * i) for i in range(n_leaves)}


def _primitive_counts(n_leaves: int, fuse: bool) -> dict[str, int]:
    params = _tree(n_leaves)
    opt = shardopt.Optimizer(shardopt.adamw(1e-2), params, fuse=fuse)
    jaxpr = jax.make_jaxpr(lambda p, o, g: o.step(p, g))(params, opt, params)
    counts: dict[str, int] = {}
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
    return counts


def test_the_fused_update_does_not_grow_with_the_leaves():
    # packing (concatenate) and unpacking (slice, reshape) are per leaf; the
    # arithmetic of the update is once per buffer, whatever the leaf count
    arithmetic = ("mul", "add", "sub", "div", "sqrt", "pow", "integer_pow")
    few, many = _primitive_counts(3, True), _primitive_counts(30, True)
    for name in arithmetic:
        assert few.get(name, 0) == many.get(name, 0), name
    per_leaf = _primitive_counts(30, False)
    assert per_leaf["mul"] > many["mul"]
    assert many["concatenate"] == 2  # the gradients and the parameters


def _distinct_kernels(n_leaves: int) -> int:
    """Distinct fused computations XLA compiled for a fused AdamW step (each
    distinct one is compiled on its own; identical ones once), names and
    metadata aside."""
    params = _tree(n_leaves)
    opt = shardopt.Optimizer(shardopt.adamw(1e-2), params, fuse=True)
    step = jax.jit(lambda p, o, g: o.step(p, g))
    text = step.lower(params, opt, params).compile().as_text()
    bodies = re.findall(r"^%fused_computation[.\d]* (.*?)^}", text, re.M | re.S)

    def strip(body: str) -> str:
        body = re.sub(r", metadata=\{[^}]*\}", "", body)
        body = re.sub(r"%[\w.-]+", "%", body)
        return re.sub(r"[\w.]+: ", ": ", body)  # the parameters' names

    return len({strip(body) for body in bodies})


def test_unpacking_compiles_one_kernel_per_leaf_size():
    # the slices that give the parameters back start at offsets XLA sees only
    # at run time, so 80 leaves of one shape cost what 20 do to compile
    assert _distinct_kernels(80) == _distinct_kernels(20) < 20


def test_packing_concatenates_in_bounded_chunks():
    params = _tree(200)
    opt = shardopt.Optimizer(shardopt.sgd(1e-2), params, fuse=True)
    jaxpr = jax.make_jaxpr(lambda p, o, g: o.step(p, g))(params, opt, params)
    widths = [len(e.invars) for e in jaxpr.eqns if e.primitive.name == "concatenate"]
    assert max(widths) == CONCAT_WIDTH == 64
    # parameters and gradients: 200 = 3 * 64 + 8 leaves, then those 4 parts
    assert sorted(widths) == [4, 4, 8, 8] + [64] * 6


def test_layout_groups_by_dtype_and_round_trips():
    tree = {
        "a": jnp.arange(6.0).reshape(2, 3),
        "b": jnp.ones((2,), jnp.bfloat16),
        "c": jnp.float32(7.0),
        "d": None,
        "e": jnp.zeros((0, 3)),
        "f": jnp.full((2,), 3.0),
    }
    layout = FlatLayout.of(tree)
    packed = layout.pack(tree)
    assert [b.shape for b in packed.buffers] == [(9,), (2,)]
    assert [b.dtype for b in packed.buffers] == [jnp.float32, jnp.bfloat16]
    jax.tree.map(np.testing.assert_array_equal, layout.unpack(packed), tree)
    traced = jax.jit(lambda t: layout.unpack(layout.pack(t)))(tree)  # runtime offsets
    jax.tree.map(np.testing.assert_array_equal, traced, tree)
    assert layout == FlatLayout.of(tree) and hash(layout) == hash(FlatLayout.of(tree))


def test_state_is_shown_per_leaf_and_stored_packed():
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    opt = shardopt.Optimizer(shardopt.adam(1e-2), params, fuse=True)
    assert isinstance(opt.stored_state[0].mu, Packed)
    assert opt.state[0].mu["w"].shape == (2, 3)
    stored = sum(x.nbytes for x in jax.tree.leaves(opt.stored_state))
    per_leaf = shardopt.Optimizer(shardopt.adam(1e-2), params, fuse=False)
    assert stored == sum(x.nbytes for x in jax.tree.leaves(per_leaf.state))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    fused_bytes = measure_memory(mesh, opt=opt).totals()["state"]
    assert fused_bytes == measure_memory(mesh, opt=per_leaf).totals()["state"]
    assert fused_bytes == (stored + opt.count.nbytes,)


def test_replace_state_packs_a_per_leaf_state():
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    opt = shardopt.Optimizer(shardopt.adam(1e-2), params, fuse=True)
    state = jax.tree.map(lambda x: x + 1, opt.state)
    new = opt.replace_state(state, jnp.int32(5))
    assert isinstance(new.stored_state[0].nu, Packed)
    jax.tree.map(np.testing.assert_array_equal, new.state, state)
    assert int(new.count) == 5
    with pytest.raises(ValueError, match="not laid out like this optimizer's state"):
        opt.replace_state(({"w": 1.0}, opt.state[1]))


def test_params_of_another_shape_are_named():
    params = {"w": jnp.ones((2, 3))}
    opt = shardopt.Optimizer(shardopt.adam(1e-2), params, fuse=True)
    other = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match=r"\['w'\].*\(3, 2\).*\(2, 3\)"):
        opt.step(other, other)


def test_non_elementwise_and_the_default_stay_per_leaf():
    params = {"w": jnp.ones((2, 3))}
    clipped = shardopt.chain(shardopt.clip_by_global_norm(1.0), shardopt.adam(1e-2))
    assert shardopt.Optimizer(clipped, params, fuse=True).layout is None
    masked = shardopt.adamw(1e-2, mask=lambda p: jax.tree.map(lambda x: True, p))
    assert shardopt.Optimizer(masked, params, fuse=True).layout is None
    assert shardopt.Optimizer(shardopt.adam(1e-2), params).layout is None  # default


def test_the_default_packs_many_leaves_and_keeps_few_apart():
    many, few = _tree(AUTO_MIN_LEAVES), _tree(AUTO_MIN_LEAVES - 1)
    abstract = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree
    )
    adam = shardopt.adam(1e-2)
    assert shardopt.Optimizer(adam, abstract(many)).layout.n_leaves == 256
    assert shardopt.Optimizer(adam, abstract(few)).layout is None
    assert shardopt.Optimizer(adam, abstract(few), fuse=True).layout is not None
    assert shardopt.Optimizer(adam, abstract(many), fuse=False).layout is None
    clipped = shardopt.chain(shardopt.clip_by_global_norm(1.0), adam)
    assert shardopt.Optimizer(clipped, abstract(many)).layout is None


@pytest.mark.parametrize("fuse", ["yes", 1, np.bool_(True)])
def test_fuse_other_than_a_bool_or_none_is_refused(fuse):
    with pytest.raises(TypeError, match=r"fuse must be True, False or None"):
        shardopt.Optimizer(shardopt.adam(1e-2), {"w": jnp.ones(2)}, fuse=fuse)


def test_abstract_init_is_fused_too():
    params = make_shardable_params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    got = shardopt.Optimizer(shardopt.adamw(1e-2), abstract, fuse=True)
    want = shardopt.Optimizer(shardopt.adamw(1e-2), params, fuse=True)
    assert got.layout == want.layout
    pairs = zip(jax.tree.leaves(got.state), jax.tree.leaves(want.state), strict=True)
    for g, w in pairs:
        assert (g.shape, g.dtype) == (w.shape, w.dtype)


@pytest.mark.parametrize("save_fused", [True, False])
def test_checkpoint_holds_the_per_leaf_state_either_way(tmp_path, save_fused):
    transform = shardopt.adamw(1e-2)
    params, saved = _run(transform, save_fused)
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(STEPS, params=params, opt=saved)
        ckpt.wait()
        fuse = not save_fused
        like = shardopt.Optimizer(transform, make_shardable_params(), fuse=fuse)
        restored = ckpt.restore(params=params, opt=like).opt
    assert (restored.layout is None) == save_fused
    jax.tree.map(np.testing.assert_array_equal, restored.state, saved.state)
    assert int(restored.count) == STEPS


def test_optax_state_round_trip_through_a_fused_optimizer():
    params, opt = _run(shardopt.adam(1e-2), True)
    theirs = to_optax(opt, optax.adam(1e-2).init(params))
    np.testing.assert_array_equal(theirs[0].mu["matrix"], opt.state[0].mu["matrix"])
    back = from_optax(
        theirs, shardopt.Optimizer(shardopt.adam(1e-2), params, fuse=True)
    )
    assert back.layout is not None
    jax.tree.map(np.testing.assert_array_equal, back.state, opt.state)


def test_restore_into_a_hand_placed_fused_optimizer(tmp_path):
    params, saved = _run(shardopt.adamw(1e-2), False)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    like = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        shardopt.Optimizer(shardopt.adamw(1e-2), make_shardable_params(), fuse=True),
    )
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(STEPS, params=params, opt=saved)
        ckpt.wait()
        restored = ckpt.restore(opt=like).opt
    assert restored.layout is not None
    for buffer in jax.tree.leaves(restored.stored_state):
        assert buffer.sharding == replicated
    jax.tree.map(np.testing.assert_array_equal, restored.state, saved.state)


def test_an_equinox_model_keeps_its_tree_and_numbers():
    model = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))
    x = jnp.ones((5, 3))
    loss = lambda m: jnp.sum(jax.vmap(m)(x) ** 2)
    results = []
    for fuse in (True, False):
        params = model
        opt = shardopt.Optimizer(shardopt.adamw(1e-2), params, fuse=fuse)
        for _ in range(3):
            params, opt = opt.step(params, eqx.filter_grad(loss)(params))
        results.append(params)
    assert jax.tree.structure(results[0]) == jax.tree.structure(model)
    jax.tree.map(
        np.testing.assert_array_equal,
        eqx.filter(results[0], eqx.is_array),
        eqx.filter(results[1], eqx.is_array),
    )


def test_a_vmapped_fused_step_equals_the_steps_one_by_one():
    # under vmap the offsets' conditional becomes a select of equal branches
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3), "c": jnp.ones(2)}
    stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), params)
    opt = shardopt.Optimizer(shardopt.adam(1e-2), params, fuse=True)
    opts = jax.vmap(lambda p: shardopt.Optimizer(shardopt.adam(1e-2), p, fuse=True))(
        stacked
    )
    new, _ = jax.vmap(lambda p, o: o.step(p, p))(stacked, opts)
    for k in range(2):
        take = operator.itemgetter(k)
        one = jax.tree.map(take, stacked)
        want, _ = opt.step(one, one)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(take, new), want)
