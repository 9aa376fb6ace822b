"""shardopt.linen.TrainState: flax's TrainState with a ZeRO plan from the
model's own (logical) partitioning annotations."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import shardopt
import shardopt.linen
from shardopt.checkpoint import CheckpointMismatchError

MESH = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
RULES = [("embed", None), ("mlp", "model")]
X = jax.random.normal(jax.random.key(1), (8, 16))
Y = jax.random.normal(jax.random.key(2), (8, 4))
init = nn.initializers.lecun_normal()


class MLP(nn.Module):
    """One logically partitioned kernel, one partitioned on mesh axes directly."""

    annotated: bool = True

    @nn.compact
    def __call__(self, x):
        up = nn.with_logical_partitioning(init, ("embed", "mlp"))
        down = nn.with_partitioning(init, ("model", None))
        if not self.annotated:
            up = down = init
        x = jax.nn.relu(nn.Dense(32, kernel_init=up)(x))
        return nn.Dense(4, kernel_init=down)(x)


def boxed_params(annotated: bool = True):
    return MLP(annotated).init(jax.random.key(0), X)["params"]


def loss_fn(params, apply_fn, x, y):
    return jnp.mean((apply_fn({"params": params}, x) - y) ** 2)


@jax.jit
def train_step(state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, x, y)
    return state.apply_gradients(grads=grads), loss


def train(state, steps: int = 3):
    losses = []
    for _ in range(steps):
        state, loss = train_step(state, X, Y)
        losses.append(float(loss))
    return state, losses


def plan(stage):
    return shardopt.zero(stage, MESH, min_size=64)


def create(stage, tx=None, **kwargs):
    return shardopt.linen.TrainState.create(
        apply_fn=MLP().apply,
        params=boxed_params(),
        tx=tx if tx is not None else shardopt.adamw(1e-2),
        plan=plan(stage),
        rules=RULES,
        **kwargs,
    )


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def placed_by_hand():
    # optax + flax, by hand: unbox, lay out by the annotations and the rules
    boxed = boxed_params()
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), RULES)
    shardings = jax.tree.map(
        lambda s: NamedSharding(MESH, s),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return jax.device_put(nn.unbox(boxed), shardings)


@pytest.fixture(scope="module")
def reference():
    state = train_state.TrainState.create(
        apply_fn=MLP().apply, params=placed_by_hand(), tx=optax.adamw(1e-2)
    )
    with jax.numpy_dtype_promotion("standard"):
        return train(state)


@pytest.fixture(scope="module")
def stage0():
    return train(create(0))


def test_optax_transform_equals_flax_train_state(reference):
    # the same optimizer (optax's AdamW), no plan: bit for bit flax's. (With a
    # plan, every leaf is held in its layout; flax's jit lets XLA pick the
    # biases' output layout, so its sums differ in the last bit.)
    ref, ref_losses = reference
    state = shardopt.linen.TrainState.create(
        apply_fn=MLP().apply, params=placed_by_hand(), tx=optax.adamw(1e-2)
    )
    state, losses = train(state)
    assert losses == ref_losses
    jax.tree.map(np.testing.assert_array_equal, state.params, ref.params)
    assert int(state.step) == int(ref.step) == 3


def test_shardopt_adamw_agrees_with_optax(reference, stage0):
    np.testing.assert_allclose(stage0[1], reference[1], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        stage0[0].params,
        reference[0].params,
    )


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_stage_equals_stage_0(stage0, stage):
    state, losses = train(create(stage))
    np.testing.assert_allclose(losses, stage0[1], rtol=1e-6)
    jax.tree.map(close, state.params, stage0[0].params)
    # the layout starts from the annotations: 'mlp' -> 'model' by the rules
    mu = state.opt_state[0].mu
    assert mu["Dense_0"]["kernel"].sharding.spec == PartitionSpec("data", "model")
    assert mu["Dense_1"]["kernel"].sharding.spec == PartitionSpec("model", "data")
    kernel = state.params["Dense_0"]["kernel"].sharding.spec
    want = (
        PartitionSpec("data", "model") if stage == 3 else PartitionSpec(None, "model")
    )
    assert kernel == want


def test_checkpoint_round_trip_onto_another_stage(stage0, tmp_path):
    state = stage0[0]
    with shardopt.CheckpointManager(tmp_path) as ckpt:
        shardopt.linen.save(ckpt, 3, state)
    with shardopt.CheckpointManager(tmp_path) as ckpt:
        got, restored = shardopt.linen.restore(ckpt, create(2))
    assert restored.step == 3 and int(got.step) == 3
    jax.tree.map(np.testing.assert_array_equal, got.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, got.opt_state, state.opt_state)
    mu = got.opt_state[0].mu["Dense_0"]["kernel"]
    assert mu.sharding.spec == PartitionSpec("data", "model")


def test_logical_names_need_rules():
    with pytest.raises(ValueError, match=r"\['Dense_0'\]\['kernel'\].*no logical"):
        shardopt.linen.TrainState.create(
            apply_fn=MLP().apply,
            params=boxed_params(),
            tx=shardopt.sgd(0.1),
            plan=plan(1),
        )
    # the context's rules count too
    with nn.logical_axis_rules(RULES):
        state = shardopt.linen.TrainState.create(
            apply_fn=MLP().apply,
            params=boxed_params(),
            tx=shardopt.sgd(0.1),
            plan=plan(1),
        )
    assert state.params["Dense_0"]["kernel"].sharding.spec == PartitionSpec(
        None, "model"
    )


def test_annotation_naming_an_axis_the_mesh_lacks():
    other = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match=r"\['Dense_1'\]\['kernel'\].*no axis 'model'"):
        shardopt.linen.TrainState.create(
            apply_fn=MLP().apply,
            params=boxed_params(),
            tx=shardopt.sgd(0.1),
            plan=shardopt.zero(1, other),
            rules=[("mlp", None)],
        )


def test_unannotated_params_are_warned_about_and_train():
    with pytest.warns(shardopt.linen.UnannotatedModelWarning, match="stage 1"):
        state = shardopt.linen.TrainState.create(
            apply_fn=MLP(False).apply,
            params=boxed_params(False),
            tx=shardopt.adamw(1e-2),
            plan=plan(1),
        )
    state, losses = train(state, 2)
    assert losses[-1] < losses[0]
    mu = state.opt_state[0].mu["Dense_0"]["kernel"]
    assert mu.sharding.spec == PartitionSpec(None, "data")


def test_subclass_fields_are_created_and_checkpointed(tmp_path):
    class WithStats(shardopt.linen.TrainState):
        batch_stats: dict

    stats = {"mean": jnp.arange(4.0)}
    state = WithStats.create(
        apply_fn=MLP().apply,
        params=boxed_params(),
        tx=shardopt.sgd(0.1),
        plan=plan(1),
        rules=RULES,
        batch_stats=stats,
    )
    with shardopt.CheckpointManager(tmp_path) as ckpt:
        shardopt.linen.save(ckpt, 0, state)
    target = state.replace(batch_stats={"mean": jnp.zeros(4)})
    with shardopt.CheckpointManager(tmp_path) as ckpt:
        got, _ = shardopt.linen.restore(ckpt, target)
    assert isinstance(got, WithStats)
    np.testing.assert_array_equal(got.batch_stats["mean"], stats["mean"])
    # another model's checkpoint: the paths that differ are named
    other = shardopt.linen.TrainState.create(
        apply_fn=MLP().apply, params={"w": jnp.ones(3)}, tx=shardopt.sgd(0.1)
    )
    with (
        shardopt.CheckpointManager(tmp_path) as ckpt,
        pytest.raises(CheckpointMismatchError, match="params/Dense_0/kernel"),
    ):
        shardopt.linen.restore(ckpt, other)
