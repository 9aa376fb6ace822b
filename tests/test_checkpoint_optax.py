"""Migration from and to optax: live states, and optax checkpoints saved with Orbax."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _ckpt_helpers import abstract, arrays_equal, mesh
from conformance import (
    BF16_RTOL,
    ROWS_BY_NAME,
    _oracle_step,
    make_params,
    ours_step,
    relative_difference,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt.checkpoint import (
    CheckpointMismatchError,
    from_optax,
    restore_from_optax,
    to_optax,
)

HALF = 5  # steps on each side of the migration


# One row per kind of optax state (trace, Adam, masked, schedule, centred RMS with
# momentum, sum of squares, Lion, no count at all): the mapping is by path, so
# the other rows add compile time, not coverage.
MIGRATION_ROWS = [
    "sgd_momentum",
    "adam",
    "adamw_masked",
    "adamw_schedule",
    "rmsprop_centered_momentum",
    "adagrad",
    "lion",
    "clip_trace_scale",
    "adan_masked_exact_betas",  # optax names Adan's count ``t``
    "optimistic_adam_v2_exact_betas",  # optax keeps ``is_initial_step``
]


@functools.cache
def optax_step_fn(name):
    transform = ROWS_BY_NAME[name].oracle()
    return jax.jit(
        lambda p, s, i: _oracle_step.__wrapped__(p, s, i, update=transform.update)
    )


def optax_steps(row, params, state, start, stop):
    with jax.numpy_dtype_promotion("standard"):
        for step in range(start, stop):
            params, state = optax_step_fn(row.name)(params, state, jnp.int32(step))
    return params, state


def optax_init(row, params):
    with jax.numpy_dtype_promotion("standard"):
        return row.oracle().init(params)


def ours_steps(params, opt, start, stop):
    for step in range(start, stop):
        params, opt = ours_step(jnp.int32(step), params, opt)
    return params, opt


def optax_counts(state):
    return [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
        if getattr(path[-1], "name", None) == "count"
    ]


def assert_close(row, params, reference):
    differences = relative_difference(params, reference)
    for leaf, difference in differences.items():
        bound = BF16_RTOL if reference[leaf].dtype == jnp.bfloat16 else row.rtol
        assert difference <= bound, (leaf, differences)


@pytest.mark.parametrize("name", MIGRATION_ROWS)
def test_migration_continues_training(name):
    """5 optax steps, migrate, 5 shardopt steps == 10 optax steps; and the reverse."""
    row = ROWS_BY_NAME[name]
    initial = optax_init(row, make_params())
    reference, _ = optax_steps(row, make_params(), initial, 0, 2 * HALF)

    params, state = optax_steps(row, make_params(), initial, 0, HALF)
    like = shardopt.Optimizer(row.ours(), params)
    # a count optax does not keep comes from the one it keeps, or from count=
    count = None if optax_counts(state) else HALF
    opt = from_optax(state, like=like, count=count)
    assert int(opt.count) == HALF
    assert jax.tree.structure(opt) == jax.tree.structure(like)
    for leaf in jax.tree.leaves(eqx.filter(opt.state, eqx.is_array)):
        if leaf.dtype == jnp.int32 and leaf.shape == ():
            assert int(leaf) == HALF
    migrated, _ = ours_steps(params, opt, HALF, 2 * HALF)
    assert_close(row, migrated, reference)

    params = make_params()
    params, opt = ours_steps(params, shardopt.Optimizer(row.ours(), params), 0, HALF)
    like = jax.eval_shape(lambda: initial)
    state = to_optax(opt, like=like)
    assert jax.tree.structure(state) == jax.tree.structure(initial)
    assert all(int(c) == HALF for c in optax_counts(state))
    exported, _ = optax_steps(row, params, state, HALF, 2 * HALF)
    assert_close(row, exported, reference)


def test_unmapped_state_lists_paths():
    row = ROWS_BY_NAME["adam"]
    state = optax_init(row, make_params())
    like = shardopt.Optimizer(shardopt.sgd(1e-2, momentum=0.9), make_params())
    with pytest.raises(CheckpointMismatchError) as err:
        from_optax(state, like=like)
    message = str(err.value)
    assert "in the optax state but not the shardopt one: 0/mu/cube" in message
    assert "0/nu/vector" in message
    assert "in the shardopt state but not the optax one: 0/trace/cube" in message
    bf16_mu = shardopt.Optimizer(
        shardopt.adam(1e-2, mu_dtype=jnp.bfloat16), make_params()
    )
    with pytest.raises(CheckpointMismatchError, match="0/mu/cube: optax float32"):
        from_optax(state, like=bf16_mu)
    with pytest.raises(
        CheckpointMismatchError,
        match="in the optax state but not the shardopt one: 0/mu",
    ):
        to_optax(like, like=state)


def test_counts_needed_or_disagreeing():
    params = make_params()
    like = shardopt.Optimizer(shardopt.sgd(1e-2), params)
    with pytest.raises(ValueError, match="pass count="):
        from_optax(optax.sgd(1e-2).init(params), like=like)
    state = optax.chain(optax.scale_by_adam(), optax.scale_by_lion()).init(params)
    state = (state[0]._replace(count=jnp.int32(3)), state[1])
    like = shardopt.Optimizer(
        shardopt.chain(shardopt.scale_by_adam(), shardopt.scale_by_lion()), params
    )
    with pytest.raises(ValueError, match=r"counts disagree \(0/count=3, 1/count=0\)"):
        from_optax(state, like=like)
    assert int(from_optax(state, like=like, count=7).count) == 7


@pytest.fixture(scope="module")
def optax_trained():
    row = ROWS_BY_NAME["adamw_masked"]
    params = make_params()
    return optax_steps(row, params, optax_init(row, params), 0, HALF)


def zero1_like(tree, mesh_):
    def spec(x):
        split = x.ndim and x.shape[0] % mesh_.shape["data"] == 0
        return NamedSharding(mesh_, P("data") if split else P())

    return abstract(tree, spec)


@pytest.mark.parametrize("saver", ["standard_checkpointer", "checkpoint_manager"])
def test_restore_plain_orbax_optax_checkpoint(tmp_path, optax_trained, saver):
    params, state = optax_trained
    tree = {"params": params, "opt_state": state, "step": HALF}
    if saver == "standard_checkpointer":
        directory = tmp_path / "ckpt"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(directory, tree)
        step = -1
    else:
        directory = tmp_path
        with ocp.CheckpointManager(directory) as manager:
            manager.save(HALF, args=ocp.args.StandardSave(tree))
        step = HALF
    # the user's own targets: a ZeRO-1 layout on 4 devices, built abstractly
    m4 = mesh(4)
    abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
    )
    row = ROWS_BY_NAME["adamw_masked"]
    # the transform stays concrete: an optax checkpoint holds no hyperparameters
    like_opt = shardopt.Optimizer(row.ours(), abstract_params)
    like_opt = eqx.tree_at(
        lambda o: (o.state, o.count),
        like_opt,
        zero1_like((like_opt.state, like_opt.count), m4),
        is_leaf=lambda x: x is None,
    )
    like_params = zero1_like(abstract_params, m4)
    got = restore_from_optax(directory, params=like_params, opt=like_opt)
    assert got.step == step
    expected = from_optax(state, like=shardopt.Optimizer(row.ours(), params))
    assert arrays_equal(got.opt, expected)
    assert all(np.array_equal(got.params[k], params[k]) for k in params)
    want = jax.tree.leaves(eqx.filter(like_opt.state, lambda x: hasattr(x, "sharding")))
    have = jax.tree.leaves(eqx.filter(got.opt.state, eqx.is_array))
    assert [x.sharding for x in have] == [x.sharding for x in want]
    assert got.opt.count.sharding == NamedSharding(m4, P())
    # the optimizer alone (for serving the params elsewhere)
    only = restore_from_optax(directory, opt=like_opt)
    assert only.params is None and arrays_equal(only.opt, expected)


def test_restore_plain_orbax_errors(tmp_path, optax_trained):
    params, state = optax_trained
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "c", {"model": params, "optimizer": state})
    like = shardopt.Optimizer(ROWS_BY_NAME["adamw_masked"].ours(), params)
    with pytest.raises(CheckpointMismatchError, match="keys: model, optimizer"):
        restore_from_optax(tmp_path / "c", opt=like)
    got = restore_from_optax(
        tmp_path / "c",
        opt=like,
        params=params,
        params_key="model",
        opt_state_key="optimizer",
    )
    assert int(got.opt.count) == HALF
    other = shardopt.Optimizer(shardopt.lion(1e-3), params)
    with pytest.raises(CheckpointMismatchError, match="0/nu/cube"):
        restore_from_optax(tmp_path / "c", opt=other, opt_state_key="optimizer")
