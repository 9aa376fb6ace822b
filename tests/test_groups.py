"""Parameter groups by path on Equinox models, NNX state and plain dicts (their
guide, docs/groups.md, runs and its printed output is checked in
tests/test_docs.py)."""

import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

import shardopt
from shardopt.checkpoint import CheckpointManager

# ---------------------------------------------------------------- models


class Block(eqx.Module):
    attn: eqx.nn.Linear
    norm: eqx.nn.LayerNorm

    def __init__(self, key):
        self.attn = eqx.nn.Linear(8, 8, key=key)
        self.norm = eqx.nn.LayerNorm(8)


class Model(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list
    head: eqx.nn.Linear

    def __init__(self, seed=0):
        keys = jax.random.split(jax.random.key(seed), 4)
        self.embed = eqx.nn.Embedding(16, 8, key=keys[0])
        self.blocks = [Block(keys[1]), Block(keys[2])]
        self.head = eqx.nn.Linear(8, 16, key=keys[3])


EQX_PATHS = [
    "embed.weight",
    "blocks.0.attn.weight",
    "blocks.0.attn.bias",
    "blocks.0.norm.weight",
    "blocks.0.norm.bias",
    "blocks.1.attn.weight",
    "blocks.1.attn.bias",
    "blocks.1.norm.weight",
    "blocks.1.norm.bias",
    "head.weight",
    "head.bias",
]


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.Linear(8, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(16, 8, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(rngs), NnxBlock(rngs)])
        self.head = nnx.Linear(8, 16, rngs=rngs)


def nnx_state():
    _, state = nnx.split(NnxModel(nnx.Rngs(0)), nnx.Param)
    return state


def hidden_matrix(path, leaf):
    """The hidden 2-D matrices: inside a block, two dimensions."""
    return path.startswith("blocks.") and leaf.ndim == 2


def recipe():
    """AdamW everywhere; the hidden matrices with their own transform; no
    decay on norms and biases; the head with a smaller learning rate."""
    return shardopt.param_groups(
        shardopt.adamw(1e-2, 0.875, 1 - 2**-10, weight_decay=0.1),
        hidden=shardopt.group(
            hidden_matrix, transform=shardopt.adamw(3e-2, 0.875, weight_decay=0.0)
        ),
        no_decay=shardopt.group("blocks.*.norm.*", "**.bias", weight_decay=0.0),
        head=shardopt.group("head.weight", learning_rate=1e-3),
    )


RECIPE_LABELS = {
    "embed.weight": "default",
    "head.weight": "head",
    **{f"blocks.{i}.attn.weight": "hidden" for i in (0, 1)},
    **{f"blocks.{i}.{n}": "no_decay" for i in (0, 1) for n in ("attn.bias",)},
    **{f"blocks.{i}.norm.{n}": "no_decay" for i in (0, 1) for n in ("weight", "bias")},
    "head.bias": "no_decay",
}


def grads_for(params, step):
    """Deterministic gradients shaped like the trainable leaves."""
    trained = eqx.filter(params, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(trained)
    out = [
        jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) * 0.37 + i + step)
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, out)


TRACES = {"train_step": 0}


@eqx.filter_jit
def train_step(params, opt, step):
    TRACES["train_step"] += 1
    return opt.step(params, grads_for(params, step))


def run(transform, params, steps=3, plan=None):
    opt = shardopt.Optimizer(transform, params, plan=plan)
    for step in range(steps):
        params, opt = train_step(params, opt, jnp.float32(step))
    return params, opt


def assert_equal(a, b):
    a_leaves = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    b_leaves = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    assert len(a_leaves) == len(b_leaves)
    for x, y in zip(a_leaves, b_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------- paths


def assigned(transform, params):
    params = eqx.filter(params, eqx.is_inexact_array)
    return {a.path: a.group for a in transform.assign(params)}


def test_one_dotted_path_for_equinox_nnx_state_and_dicts():
    tx = recipe()
    eqx_paths = assigned(tx, Model())
    assert list(eqx_paths) == EQX_PATHS
    assert eqx_paths == RECIPE_LABELS
    everything = shardopt.param_groups(shardopt.sgd(1e-2))
    state = nnx_state()
    nnx_paths = [a.path for a in everything.assign(state)]
    assert nnx_paths[:2] == ["blocks.0.attn.bias", "blocks.0.attn.kernel"]
    assert nnx_paths[-3:] == ["embed.embedding", "head.bias", "head.kernel"]
    assert nnx_paths == [a.path for a in everything.assign(nnx.to_pure_dict(state))]
    nested = {"a": [{"b": jnp.ones(2)}, (jnp.ones(1),)]}
    assert [a.path for a in everything.assign(nested)] == ["a.0.b", "a.1.0"]


@pytest.mark.parametrize(
    "pattern, path, hit",
    [
        ("blocks.*.attn.weight", "blocks.0.attn.weight", True),
        ("blocks.*.attn.weight", "blocks.0.x.attn.weight", False),
        ("blocks.*.attn.*", "blocks.12.attn.bias", True),
        ("**.bias", "bias", True),
        ("**.bias", "blocks.0.attn.bias", True),
        ("**.bias", "blocks.0.attn.bias_scale", False),
        ("blocks.**", "blocks.1.norm.weight", True),
        ("blocks.?.attn.*", "blocks.10.attn.bias", False),
        ("blocks.[01].**", "blocks.1.norm.weight", True),
        ("head", "head.weight", False),
        (re.compile(r"blocks\.\d+\.attn\..*"), "blocks.3.attn.weight", True),
        (re.compile("blocks"), "blocks.3.attn.weight", False),  # fullmatch
    ],
)
def test_pattern_syntax(pattern, path, hit):
    parts = tuple(path.split("."))
    assert shardopt.PathPattern(pattern).matches(parts, jnp.ones(1)) is hit


def test_predicate_sees_the_dotted_path_and_the_leaf():
    seen = []
    pattern = shardopt.PathPattern(lambda path, leaf: seen.append((path, leaf.shape)))
    with pytest.raises(TypeError, match=r"returned NoneType for a\.b"):
        pattern.matches(("a", "b"), jnp.ones((2, 3)))
    assert seen == [("a.b", (2, 3))]


# ---------------------------------------------------------------- numbers


def test_groups_equal_a_partition_with_the_same_labels():
    model = Model()
    labels = jax.tree.unflatten(
        jax.tree.structure(eqx.filter(model, eqx.is_inexact_array)),
        [RECIPE_LABELS[p] for p in EQX_PATHS],
    )
    default = shardopt.adamw(1e-2, 0.875, 1 - 2**-10, weight_decay=0.1)
    by_hand = shardopt.partition(
        {
            "hidden": shardopt.adamw(3e-2, 0.875, weight_decay=0.0),
            "no_decay": shardopt.adamw(1e-2, 0.875, 1 - 2**-10, weight_decay=0.0),
            "head": shardopt.adamw(1e-3, 0.875, 1 - 2**-10, weight_decay=0.1),
            "default": default,
        },
        labels,
    )
    got, opt = run(recipe(), model)
    want, _ = run(by_hand, model)
    assert_equal(got, want)
    # every group moved its parameters, each with its own state
    assert set(opt.state.inner_states) == {"hidden", "no_decay", "head", "default"}


def test_per_group_learning_rate_zero_and_freezing():
    model = Model()
    tx = shardopt.param_groups(
        shardopt.adam(1e-2),
        still=shardopt.group("head.*", learning_rate=0.0),
        frozen=shardopt.group("embed.weight", frozen=True),
    )
    params, opt = run(tx, model)
    assert_equal((params.head, params.embed), (model.head, model.embed))
    assert not np.array_equal(params.blocks[0].attn.weight, model.blocks[0].attn.weight)
    # learning rate 0: the moments still move; frozen: no state at all
    head_mu = opt.state.inner_states["still"].inner_state[0].mu.head.weight
    assert np.abs(np.asarray(head_mu)).sum() > 0
    assert opt.state.inner_states["frozen"].inner_state == shardopt.EmptyState()
    default_mu = opt.state.inner_states["default"].inner_state[0].mu
    assert default_mu.embed.weight is None and default_mu.head.weight is None


def test_reset_one_group_keeps_the_others():
    model = Model()
    params, opt = run(recipe(), model)
    reset = opt.reset_group("head", params)
    head = reset.state.inner_states["head"].inner_state[0]
    assert int(head.count) == 0
    assert float(jnp.abs(head.mu.head.weight).sum()) == 0.0
    for name in ("hidden", "no_decay", "default"):
        assert_equal(reset.state.inner_states[name], opt.state.inner_states[name])
    assert int(reset.count) == int(opt.count) == 3
    # the functional form on the transform's own state gives the same
    fresh = recipe().reset(opt.state, "head", eqx.filter(params, eqx.is_inexact_array))
    assert_equal(fresh, reset.state)
    # no two leaves share a buffer, so the optimizer can be donated
    donated = eqx.filter_jit(donate="all")(lambda p, o, g: o.step(p, g))
    grads = grads_for(params, 0.0)
    donated(params, reset, grads)
    params, opt = run(recipe(), model)
    reset = opt.reset_group("head", params)
    # the reset optimizer steps on with the same compiled step
    before = TRACES["train_step"]
    train_step(params, reset, jnp.float32(3))
    assert TRACES["train_step"] == before


def test_a_reset_group_whose_init_returns_its_parameters_can_be_donated():
    # SAM's fresh cache is the parameters; RMSProp's accumulator of a scalar
    # is its initial value, a hyperparameter
    tx = shardopt.param_groups(
        shardopt.sam(shardopt.sgd(1e-2), shardopt.sgd(1e-2)),
        scalar=shardopt.group("s", transform=shardopt.rmsprop(1e-2)),
    )
    params = {"w": jnp.ones((4, 3)), "s": jnp.float32(2.0)}
    donated = eqx.filter_jit(donate="all")(
        lambda p, o: o.step(p, jax.tree.map(jnp.ones_like, p))
    )
    params, opt = donated(params, shardopt.Optimizer(tx, params))
    for name in ("default", "scalar"):
        params, opt = donated(params, opt.reset_group(name, params))
    assert int(opt.count) == 3


def test_group_table():
    params = {
        "embed": jnp.zeros((4, 2)),
        "blocks": [{"w": jnp.zeros((2, 2)), "b": jnp.zeros(2, jnp.bfloat16)}],
    }
    tx = shardopt.param_groups(
        shardopt.adamw(1e-3),
        hidden=shardopt.group("blocks.*.w", transform=shardopt.sgd(1e-2)),
        frozen=shardopt.group(re.compile("embed"), frozen=True),
    )
    opt = shardopt.Optimizer(tx, params)
    table = shardopt.group_table(opt, params)
    rows = [line.split() for line in table.splitlines()]
    assert rows[2] == [
        "default",
        "blocks.0.b",
        "2",
        "bfloat16",
        "(unmatched:",
        "default)",
    ]
    assert rows[3] == ["hidden", "blocks.0.w", "2x2", "float32", "'blocks.*.w'"]
    assert rows[4] == ["frozen", "embed", "4x2", "float32", "re.compile('embed')"]
    assert "hidden      1 leaves, 4 elements: Chain" in table
    assert "frozen      1 leaves, 8 elements: frozen (zero updates, no state)" in table
    assert "default     1 leaves, 2 elements: the default (Chain)" in table
    assert table == shardopt.group_table(tx, params)


def test_nnx_state_and_its_pure_dict_train_alike():
    tx = shardopt.param_groups(
        shardopt.adamw(1e-2),
        hidden=shardopt.group(hidden_matrix, transform=shardopt.lion(1e-3)),
        frozen=shardopt.group("embed.*", frozen=True),
    )
    state = nnx_state()
    got, opt = run(tx, state)
    want, _ = run(tx, nnx.to_pure_dict(state))
    assert isinstance(got, nnx.State)
    assert_equal(nnx.to_pure_dict(got), want)
    assert_equal(got["embed"], state["embed"])
    assert set(opt.state.inner_states) == {"hidden", "frozen", "default"}


# ---------------------------------------------------------------- sharded


@functools.cache
def mesh8():
    return Mesh(np.array(jax.devices()), ("data",))


@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_zero_stages_match_unsharded(stage):
    model = Model()
    want, want_opt = run(recipe(), model, steps=2)
    plan = shardopt.zero(stage, mesh8(), min_size=0)
    got, opt = run(recipe(), plan.shard_params(model), steps=2, plan=plan)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)
    for g, w in zip(jax.tree.leaves(opt), jax.tree.leaves(want_opt), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)
    # each group's moments are laid out by the plan like their parameters
    mu = opt.state.inner_states["hidden"].inner_state[0].mu.blocks[0].attn.weight
    spec = mu.sharding.spec
    assert ("data" in str(spec)) == (stage >= 1), spec
    # a reset group's new state is placed by the plan like the old one
    reset = opt.reset_group("hidden", got)
    new_leaves, old_leaves = jax.tree.leaves(reset.state), jax.tree.leaves(opt.state)
    for new, old in zip(new_leaves, old_leaves, strict=True):
        assert new.sharding.is_equivalent_to(old.sharding, old.ndim)


def test_checkpoint_round_trip(tmp_path):
    model = Model()
    params, opt = run(recipe(), model)
    trained = eqx.filter(params, eqx.is_array)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trained)
    like = shardopt.Optimizer(recipe(), abstract)
    with CheckpointManager(tmp_path) as manager:
        manager.save(3, params=trained, opt=opt)
        manager.wait()
        got = manager.restore(params=abstract, opt=like)
    assert_equal(got.params, trained)
    assert_equal(got.opt, opt)
    restored = eqx.combine(got.params, params)
    again, _ = train_step(restored, got.opt, jnp.float32(3))
    want, _ = train_step(params, opt, jnp.float32(3))
    assert_equal(again, want)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "groups, error, message",
    [
        (
            {
                "attn": shardopt.group("blocks.*.attn.*"),
                "biases": shardopt.group(re.compile(r".*\.bias")),
            },
            ValueError,
            r"the parameter blocks\.0\.attn\.bias is matched by group 'attn' "
            r"\(pattern 'blocks\.\*\.attn\.\*'\) and by group 'biases' "
            r"\(pattern re\.compile\('\.\*\\\\\.bias'\)\)",
        ),
        (
            {"heads": shardopt.group("head.weight", "heads.**")},
            ValueError,
            r"group 'heads': the pattern 'heads\.\*\*' matches no parameter; the "
            r"parameters are: embed\.weight, blocks\.0\.attn\.weight",
        ),
        (
            {"odd": shardopt.group(lambda path, leaf: leaf.ndim == 5)},
            ValueError,
            r"group 'odd': the pattern predicate .*<lambda> matches no parameter",
        ),
    ],
)
def test_bad_groups_name_the_path_and_the_patterns(groups, error, message):
    tx = shardopt.param_groups(shardopt.adam(1e-3), **groups)
    with pytest.raises(error, match=message):
        shardopt.Optimizer(tx, Model())


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: shardopt.group("a..b"), "the path pattern 'a..b' has an empty"),
        (lambda: shardopt.group(3), "a path pattern is a glob string.*got int"),
        (lambda: shardopt.group(), "at least one path pattern"),
        (
            lambda: shardopt.group("a", frozen=True, learning_rate=1.0),
            "a frozen group takes no transform",
        ),
        (
            lambda: shardopt.param_groups(
                shardopt.sgd(1e-2), default=shardopt.group("a")
            ),
            "'default' is the name of the group of unmatched parameters",
        ),
        (
            lambda: shardopt.param_groups(shardopt.sgd(1e-2), a="a.*"),
            "group 'a' must be given as shardopt.group",
        ),
        (
            lambda: shardopt.param_groups(
                shardopt.sgd(1e-2), a=shardopt.group("a", weight_decay=0.0)
            ),
            "group 'a': the transform has no hyperparameter 'weight_decay'; it "
            "has: learning_rate",
        ),
    ],
)
def test_bad_group_arguments(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_reset_of_an_unknown_group_names_the_groups():
    params, opt = run(recipe(), Model(), steps=1)
    with pytest.raises(ValueError, match="no parameter group named 'tail'; the"):
        opt.reset_group("tail", params)
    with pytest.raises(ValueError, match="expected one param_groups"):
        shardopt.Optimizer(shardopt.adam(1e-2), params).reset_group("head", params)
