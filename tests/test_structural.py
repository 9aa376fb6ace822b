"""The structural family beyond the conformance table: partitions under ZeRO,
bad labels, named states, backward-pass scaling and per-example clipping."""

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import shardopt
from shardopt._base import AbstractTransform, EmptyState


def _params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "w": jax.random.normal(keys[0], (64, 32)),
        "emb": jax.random.normal(keys[1], (16, 128), jnp.bfloat16),
        "b": jax.random.normal(keys[2], (32,)),
    }


LABELS = {"w": "adam", "emb": "adam", "b": "sgd"}


def _standard(fn, *args):
    with jax.numpy_dtype_promotion("standard"):
        return fn(*args)


# ---------------------------------------------------------------- ZeRO layout
def test_partition_inner_moments_are_partitioned_like_plain_adam():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    plan = shardopt.zero(1, mesh)
    params = plan.shard_params(_params())
    tx = shardopt.multi_transform(
        {"adam": shardopt.adam(1e-2), "sgd": shardopt.sgd(1e-2, momentum=0.9)},
        LABELS,
    )
    ours = shardopt.Optimizer(tx, params, plan=plan)
    plain = shardopt.Optimizer(shardopt.adam(1e-2), params, plan=plan)
    adam_state = ours.state.inner_states["adam"].inner_state[0]
    for name in ("w", "emb"):
        for moment in ("mu", "nu"):
            got = getattr(adam_state, moment)[name].sharding.spec
            want = getattr(plain.state[0], moment)[name].sharding.spec
            assert got == want, (name, moment, got, want)
            assert "data" in str(got), (name, moment, got)
        # nothing is kept for the leaves of the other label
        assert adam_state.mu["b"] is None
    momentum = ours.state.inner_states["sgd"].inner_state[0].trace
    assert momentum["w"] is None and momentum["b"].shape == (32,)
    # the plan's own account: each moment placed exactly as plain adam's
    ours_layout = {leaf.path: leaf for leaf in plan.state_layout(ours.state, params)}
    plain_layout = plan.state_layout(plain.state, params)
    want = {
        ".inner_states['adam'].inner_state" + leaf.path: leaf.spec
        for leaf in plain_layout
        if "data" in str(leaf.spec)
    }
    assert len(want) == 4, plain_layout
    got = {
        path: leaf.spec
        for path, leaf in ours_layout.items()
        if "data" in str(leaf.spec)
    }
    assert got == want
    # and a step keeps that layout
    grads = jax.tree.map(jnp.ones_like, params)
    _, stepped = eqx.filter_jit(lambda o, p, g: o.step(p, g))(ours, params, grads)
    mu = stepped.state.inner_states["adam"].inner_state[0].mu["w"]
    assert mu.sharding.is_equivalent_to(adam_state.mu["w"].sharding, mu.ndim)


# ----------------------------------------------------------------- bad labels
def test_a_label_with_no_transform_is_named():
    with pytest.raises(ValueError, match=r"labels with no transform: \['sgd'\]"):
        shardopt.partition({"adam": shardopt.adam(1e-2)}, LABELS)


def test_a_transform_with_no_label_is_named():
    transforms = {
        "adam": shardopt.adam(1e-2),
        "sgd": shardopt.sgd(1e-2),
        "lion": shardopt.lion(1e-3),
    }
    with pytest.raises(ValueError, match=r"no parameter has: \['lion'\]"):
        shardopt.partition(transforms, LABELS)


def test_label_function_mismatches_are_named_at_init():
    label_fn = lambda p: jax.tree.map(lambda x: "big" if x.ndim > 1 else "bias", p)
    tx = shardopt.partition({"big": shardopt.adam(1e-2)}, label_fn)
    with pytest.raises(ValueError, match=r"no transform: \['bias'\]"):
        tx.init(_params())
    tx = shardopt.partition(
        {"big": shardopt.adam(1e-2), "bias": shardopt.sgd(1.0), "x": shardopt.sgd(1.0)},
        label_fn,
    )
    with pytest.raises(ValueError, match=r"no parameter has: \['x'\]"):
        tx.init(_params())


def test_other_bad_partition_arguments():
    with pytest.raises(TypeError, match="mapping"):
        shardopt.partition([shardopt.sgd(1.0)], LABELS)
    with pytest.raises(ValueError, match="at least one"):
        shardopt.partition({}, LABELS)
    with pytest.raises(TypeError, match=r"label 'adam'"):
        shardopt.partition({"adam": "adam"}, {"w": "adam"})
    message = r"param_labels must hold hashable leaves.*ndarray at \[.w.\]"
    with pytest.raises(TypeError, match=message):
        shardopt.partition({"adam": shardopt.sgd(1.0)}, {"w": np.zeros(2), "b": "adam"})
    tx = shardopt.partition({"a": shardopt.sgd(1.0)}, {"w": "a", "other": "a"})
    with pytest.raises(ValueError, match="shaped like the parameters"):
        tx.init(_params())


def test_prefix_labels_and_python_hashing():
    params = {"enc": _params(), "dec": _params()}
    tx = shardopt.partition(
        {"train": shardopt.sgd(0.5), "frozen": shardopt.set_to_zero()},
        {"enc": "frozen", "dec": "train"},
    )
    assert hash(tx) == hash(
        shardopt.partition(
            {"train": shardopt.sgd(0.5), "frozen": shardopt.set_to_zero()},
            {"enc": "frozen", "dec": "train"},
        )
    )
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    for leaf in jax.tree.leaves(updates["enc"]):
        assert not np.any(np.asarray(leaf, np.float32))
    for leaf in jax.tree.leaves(updates["dec"]):
        np.testing.assert_array_equal(np.asarray(leaf, np.float32), -0.5)

    @jax.jit
    def step(p, s):
        return tx.update(grads, s, p)

    jax.jit(lambda t, p, s: t.update(grads, s, p), static_argnums=0)(tx, params, state)
    step(params, state)


def test_hyperparameters_inside_a_partition_can_be_changed():
    opt = shardopt.Optimizer(
        shardopt.partition(
            {"adam": shardopt.adam(1e-2), "sgd": shardopt.sgd(0.1)}, LABELS
        ),
        _params(),
    )
    assert "learning_rate" in opt.hyperparameters()
    opt = opt.with_hyperparameters(learning_rate=0.0)
    params = _params()
    new, _ = opt.step(params, jax.tree.map(jnp.ones_like, params))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Tagged(AbstractTransform):
    """Multiplies each update by its ``tags`` extra argument."""

    takes_extra_args: ClassVar[bool] = True

    def init(self, params):
        return EmptyState()

    def update(self, grads, state, params=None, *, tags: Any = None, **_):
        return jax.tree.map(lambda g, t: g * t.astype(g.dtype), grads, tags), state


def test_mask_compatible_extra_args():
    params = _params()
    tags = jax.tree.map(lambda p: jnp.full(p.shape, 3.0, p.dtype), params)
    tx = shardopt.partition(
        {"tag": _Tagged(), "zero": shardopt.set_to_zero()},
        {"w": "tag", "emb": "zero", "b": "tag"},
        mask_compatible_extra_args=True,
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params, tags=tags)
    np.testing.assert_array_equal(np.asarray(updates["w"]), 3.0)
    np.testing.assert_array_equal(np.asarray(updates["emb"], np.float32), 0.0)


# ------------------------------------------------------- freeze and selective
def test_freeze_everything_and_selective_transform_states():
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = shardopt.freeze(True)
    updates, _ = tx.update(grads, tx.init(params), params)
    for leaf in jax.tree.leaves(updates):
        assert not np.any(np.asarray(leaf, np.float32))
    nothing_frozen = shardopt.selective_transform(
        shardopt.adam(1e-2), freeze_mask={"w": False, "emb": False, "b": False}
    )
    assert list(nothing_frozen.init(params).inner_states) == ["train"]
    some = shardopt.selective_transform(
        optax.adam(1e-2), freeze_mask={"w": True, "emb": False, "b": False}
    )
    state = _standard(some.init, params)
    assert sorted(state.inner_states) == ["freeze", "train"]
    updates, _ = some.update(grads, state, params)
    assert not np.any(np.asarray(updates["w"]))
    assert np.all(np.asarray(updates["b"]) < 0)


# ---------------------------------------------------------------- named_chain
def test_named_chain_state_is_keyed_by_name_in_order():
    tx = shardopt.named_chain(
        ("zclip", shardopt.clip_by_global_norm(1.0)), ("adam", shardopt.adam(1e-2))
    )
    params = _params()
    state = tx.init(params)
    assert list(state) == ["zclip", "adam"]
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    assert list(state) == ["zclip", "adam"]
    assert int(state["adam"][0].count) == 1


def test_named_chain_bad_arguments():
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        shardopt.named_chain(("a", shardopt.sgd(1.0)), ("a", shardopt.sgd(1.0)))
    with pytest.raises(TypeError, match="argument 0 must be a"):
        shardopt.named_chain(shardopt.sgd(1.0))
    with pytest.raises(TypeError, match="the name must be a str"):
        shardopt.named_chain((1, shardopt.sgd(1.0)))
    with pytest.raises(TypeError, match="named_chain transform 'a'"):
        shardopt.named_chain(("a", 3))


# ------------------------------------------------------------ structural bits
def test_flatten_keeps_one_flat_state_and_takes_optax():
    params = _params()
    tx = shardopt.flatten(optax.adam(1e-2))
    state = _standard(tx.init, params)
    assert state[0].mu.shape == (64 * 32 + 16 * 128 + 32,)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
    same = {"w": params["w"], "b": params["b"]}
    flat_sgd = shardopt.flatten(shardopt.sgd(1.0))
    updates, _ = flat_sgd.update(same, flat_sgd.init(same), same)
    assert jax.tree.map(lambda u: u.dtype, updates) == {
        "w": jnp.float32,
        "b": jnp.float32,
    }


def test_stateless_and_nonnegative_bad_input():
    with pytest.raises(TypeError, match="stateless's f must be callable"):
        shardopt.stateless(3)
    with pytest.raises(TypeError, match="stateless_with_tree_map's f"):
        shardopt.stateless_with_tree_map(None)
    tx = shardopt.keep_params_nonnegative()
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update({"a": jnp.ones(2)}, tx.init(None))
    updates, _ = tx.update(
        {"a": jnp.array([-2.0, -0.5, 1.0])}, EmptyState(), {"a": jnp.ones(3)}
    )
    np.testing.assert_array_equal(np.asarray(updates["a"]), [-1.0, -0.5, 1.0])


def test_stateless_with_tree_map_without_params():
    tx = shardopt.stateless_with_tree_map(lambda g, p: 2 * g if p is None else g)
    updates, _ = tx.update({"a": jnp.ones(2)}, tx.init(None))
    np.testing.assert_array_equal(np.asarray(updates["a"]), 2.0)


def test_centralize_matches_optax_example():
    grad = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    updates, _ = shardopt.centralize().update(grad, EmptyState())
    np.testing.assert_array_equal(np.asarray(updates), [[-1, 0, 1], [-1, 0, 1]])


def test_normalize_by_update_norm_arguments():
    with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
        shardopt.normalize_by_update_norm(eps=-1.0)
    tx = shardopt.normalize_by_update_norm(
        shardopt.linear_schedule(1.0, 2.0, 1), eps=0.0
    )
    g = {"a": jnp.array([3.0, 4.0])}
    state = tx.init(g)
    first, state = tx.update(g, state)
    second, _ = tx.update(g, state)
    np.testing.assert_allclose(np.asarray(first["a"]), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(second["a"]), [1.2, 1.6], rtol=1e-6)


# ------------------------------------------------------------- scale_gradient
@pytest.mark.parametrize("scale", [0.5, -2.0, 1.0, 0.0])
def test_scale_gradient_matches_optax(scale):
    x = {"a": jnp.arange(3.0), "h": jnp.ones(2, jnp.bfloat16)}

    def loss(lib, x):
        y = lib.scale_gradient(x, scale)
        return jnp.sum(y["a"] ** 2) + jnp.sum(y["h"]).astype(jnp.float32)

    ours = jax.grad(lambda x: loss(shardopt, x))(x)
    want = _standard(jax.grad(lambda x: loss(optax, x)), x)
    assert ours["h"].dtype == jnp.bfloat16
    for name in x:
        np.testing.assert_array_equal(
            np.asarray(ours[name], np.float32), np.asarray(want[name], np.float32)
        )
    forward = shardopt.scale_gradient(x, scale)
    np.testing.assert_array_equal(np.asarray(forward["a"]), np.asarray(x["a"]))


def test_scale_gradient_traced_scale():
    grad = jax.jit(jax.grad(lambda x, s: jnp.sum(shardopt.scale_gradient(x, s))))
    np.testing.assert_array_equal(np.asarray(grad(jnp.ones(3), jnp.float32(3.0))), 3.0)
    with pytest.raises(ValueError, match="scale must be a scalar"):
        shardopt.scale_gradient(jnp.ones(3), jnp.ones(2))


# ------------------------------------------------------ per-example clipping
OPTAX_EXAMPLE = [jnp.array([[0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]


@pytest.mark.parametrize(
    ("clip", "total", "clipped"), [(jnp.inf, 7.0, 0), (0.0, 0.0, 3), (1.25, 1.75, 3)]
)
def test_per_example_clipping_optax_examples(clip, total, clipped):
    summed, count = shardopt.per_example_global_norm_clip(OPTAX_EXAMPLE, clip)
    np.testing.assert_allclose(np.asarray(summed[0]), total)
    assert summed[0].dtype == jnp.float32 and count.dtype == jnp.int32
    assert int(count) == clipped
    summed, counts = shardopt.per_example_layer_norm_clip(OPTAX_EXAMPLE, clip)
    np.testing.assert_allclose(np.asarray(summed[0]), total)
    assert [int(c) for c in counts] == [clipped]


def _batched_grads():
    keys = jax.random.split(jax.random.key(1), 3)
    return {
        "w": jax.random.normal(keys[0], (6, 5, 3)),
        "b": 0.1 * jax.random.normal(keys[1], (6, 3)),
        "c": jnp.zeros((6,)),
    }


@pytest.mark.parametrize("clip", [0.5, 2.0, 4.0])
def test_per_example_global_norm_clip_matches_optax(clip):
    grads = _batched_grads()
    ours, count = jax.jit(shardopt.per_example_global_norm_clip)(grads, clip)
    want, want_count = _standard(optax.per_example_global_norm_clip, grads, clip)
    assert int(count) == int(want_count)
    for name in grads:
        np.testing.assert_allclose(
            np.asarray(ours[name]), np.asarray(want[name]), rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("clip", [0.5, 3.0])
def test_per_example_layer_norm_clip_matches_optax(clip, uniform):
    grads = _batched_grads()
    ours, counts = shardopt.per_example_layer_norm_clip(grads, clip, uniform)
    want, want_counts = _standard(
        optax.per_example_layer_norm_clip, grads, clip, uniform
    )
    assert jax.tree.map(int, counts) == jax.tree.map(int, want_counts)
    for name in grads:
        np.testing.assert_allclose(
            np.asarray(ours[name]), np.asarray(want[name]), rtol=1e-6, atol=1e-7
        )


def test_per_example_clipping_keeps_bfloat16_and_checks_input():
    grads = {"h": jnp.ones((4, 3), jnp.bfloat16), "f": jnp.ones((4, 2))}
    summed, _ = shardopt.per_example_global_norm_clip(grads, 1.0)
    assert summed["h"].dtype == jnp.bfloat16 and summed["f"].dtype == jnp.float32
    with pytest.raises(ValueError, match="same batch dimension first"):
        shardopt.per_example_global_norm_clip(
            {"a": jnp.ones((4, 2)), "b": jnp.ones(3)}, 1.0
        )
    with pytest.raises(ValueError, match="same batch dimension first"):
        shardopt.per_example_layer_norm_clip([jnp.ones(())], 1.0)
    with pytest.raises(ValueError, match="l2_norm_clip must be >= 0"):
        shardopt.per_example_global_norm_clip(grads, -1.0)
    with pytest.raises(ValueError, match="global_l2_norm_clip must be >= 0"):
        shardopt.per_example_layer_norm_clip(grads, float("nan"))
