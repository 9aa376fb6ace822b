"""shardopt.nnx.Optimizer: a drop-in for nnx.Optimizer under ZeRO stages 0-3."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import shardopt
import shardopt.nnx
from shardopt.checkpoint import CheckpointMismatchError

MESH = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
X = jax.random.normal(jax.random.key(1), (8, 16))
Y = jax.random.normal(jax.random.key(2), (8, 4))
init = nnx.initializers.lecun_normal()


class MLP(nnx.Module):
    """Megatron-style: the first kernel split by columns, the second by rows."""

    def __init__(self, rngs: nnx.Rngs, annotated: bool = True):
        part = nnx.with_partitioning if annotated else (lambda f, _: f)
        self.up = nnx.Linear(16, 32, kernel_init=part(init, (None, "model")), rngs=rngs)
        self.down = nnx.Linear(
            32, 4, kernel_init=part(init, ("model", None)), rngs=rngs
        )

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def make_model(**kwargs) -> MLP:
    with jax.set_mesh(MESH):
        return MLP(nnx.Rngs(0), **kwargs)


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def apply(optimizer, model, grads):
    optimizer.update(model, grads)


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


def train(optimizer_fn, steps: int = 3, **model_kwargs):
    model = make_model(**model_kwargs)
    optimizer = optimizer_fn(model)
    with jax.set_mesh(MESH):
        losses = [float(train_step(model, optimizer, X, Y)) for _ in range(steps)]
    return model, optimizer, losses


def plan(stage):
    return shardopt.zero(stage, MESH, min_size=64)


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def arrays(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def reference():
    # flax's own optimizer with optax's AdamW (optax needs standard promotion)
    with jax.numpy_dtype_promotion("standard"), jax.set_mesh(MESH):
        return train(lambda m: nnx.Optimizer(m, optax.adamw(1e-2), wrt=nnx.Param))


@pytest.fixture(scope="module")
def stage0():
    return train(
        lambda m: shardopt.nnx.Optimizer(m, shardopt.adamw(1e-2), plan=plan(0))
    )


def test_optax_transform_under_zero_equals_nnx_optimizer(reference):
    # the same optimizer (optax's AdamW), ZeRO-1 placed: bit for bit flax's
    ref_model, ref_opt, ref_losses = reference
    model, optimizer, losses = train(
        lambda m: shardopt.nnx.Optimizer(m, optax.adamw(1e-2), plan=plan(1))
    )
    assert losses == ref_losses
    jax.tree.map(np.testing.assert_array_equal, arrays(model), arrays(ref_model))
    assert int(optimizer.step[...]) == int(ref_opt.step[...]) == 3
    mu = optimizer.opt_state[0].mu["up"]["kernel"][...]
    assert mu.sharding.spec == PartitionSpec("data", "model")


def test_shardopt_adamw_agrees_with_optax(reference, stage0):
    # another implementation of the same math: equal to float32 rounding
    np.testing.assert_allclose(stage0[2], reference[2], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        arrays(stage0[0]),
        arrays(reference[0]),
    )


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_stage_equals_stage_0(stage0, stage):
    model, optimizer, losses = train(
        lambda m: shardopt.nnx.Optimizer(m, shardopt.adamw(1e-2), plan=plan(stage))
    )
    # Stages 2-3 change the layouts XLA computes the step in, and so the order
    # of its sums: equal to rounding, as in tests/test_sharding.py.
    np.testing.assert_allclose(losses, stage0[2], rtol=1e-6)
    jax.tree.map(close, arrays(model), arrays(stage0[0]))
    # the moments start from the model's tensor-parallel layout, plus 'data'
    mu = optimizer.opt_state[0].mu
    assert mu["up"]["kernel"][...].sharding.spec == PartitionSpec("data", "model")
    assert mu["down"]["kernel"][...].sharding.spec == PartitionSpec("model", "data")
    kernel = model.up.kernel[...].sharding.spec
    want = (
        PartitionSpec("data", "model") if stage == 3 else PartitionSpec(None, "model")
    )
    assert kernel == want


def test_split_merge_and_state_round_trip(stage0):
    _, optimizer, _ = stage0
    graphdef, state = nnx.split(optimizer)
    again = nnx.merge(graphdef, state)
    assert int(again.step[...]) == 3
    names = {str(p[0]) for p, _ in nnx.to_flat_state(nnx.state(optimizer))}
    assert names == {"hyperparameters", "opt_state", "step"}
    core = again.to_shardopt()
    assert isinstance(core, shardopt.Optimizer) and int(core.count) == 3


def test_filters_train_only_what_wrt_selects():
    class LoRAModel(nnx.Module):
        def __init__(self, rngs):
            self.base = nnx.Linear(16, 4, rngs=rngs)
            self.lora = nnx.LoRA(16, 2, 4, rngs=rngs)

        def __call__(self, x):
            return self.base(x) + self.lora(x)

    model = LoRAModel(nnx.Rngs(0))
    base = np.asarray(model.base.kernel[...])
    optimizer = shardopt.nnx.Optimizer(model, shardopt.sgd(0.1), wrt=nnx.LoRAParam)
    diff = nnx.DiffState(0, nnx.LoRAParam)
    grads = nnx.grad(loss_fn, argnums=diff)(model, X, Y)
    before = np.asarray(model.lora.lora_b[...])
    apply(optimizer, model, grads)
    np.testing.assert_array_equal(model.base.kernel[...], base)
    assert not np.array_equal(model.lora.lora_b[...], before)
    # gradients of a Variable the optimizer does not train: named, not dropped
    all_grads = nnx.grad(loss_fn)(model, X, Y)
    with pytest.raises(ValueError, match=r"\['base'\]\['kernel'\]: Param"):
        apply(optimizer, model, all_grads)
    # nnx.Not(...) filters the other way round: the LoRA factors stay fixed
    wrt = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    frozen = shardopt.nnx.Optimizer(model, shardopt.adam(0.1), wrt=wrt)
    paths = [str(p) for p, _ in nnx.to_flat_state(nnx.state(frozen))]
    assert any("'base', 'kernel'" in p for p in paths)
    assert not any("lora" in p for p in paths)
    lora_b = np.asarray(model.lora.lora_b[...])
    apply(frozen, model, nnx.grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, X, Y))
    np.testing.assert_array_equal(model.lora.lora_b[...], lora_b)
    assert not np.array_equal(model.base.kernel[...], base)


def test_scanned_layers():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(
                16,
                16,
                kernel_init=nnx.with_partitioning(init, (None, "model")),
                rngs=rngs,
            )

        def __call__(self, x):
            return jax.nn.tanh(self.linear(x))

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make_blocks(rngs):
        return Block(rngs)

    def run(model, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(block, x):
            return block(x)

        return jnp.mean(body(model, x) ** 2)

    @nnx.jit
    def scan_step(blocks, optimizer, x):
        optimizer.update(blocks, nnx.grad(run)(blocks, x))

    results = []
    for stage in (0, 3):
        with jax.set_mesh(MESH):
            blocks = make_blocks(nnx.Rngs(0))
            optimizer = shardopt.nnx.Optimizer(
                blocks, shardopt.adam(1e-2), plan=plan(stage)
            )
            for _ in range(2):
                scan_step(blocks, optimizer, X)
        kernel = blocks.linear.kernel[...]
        assert kernel.shape == (3, 16, 16)
        results.append(np.asarray(kernel))
    np.testing.assert_array_equal(results[0], results[1])


def test_checkpoint_round_trip_and_another_model(stage0, tmp_path):
    model, optimizer, _ = stage0
    with shardopt.CheckpointManager(tmp_path) as ckpt:
        shardopt.nnx.save(ckpt, 3, model, optimizer)
    fresh = make_model()
    fresh_opt = shardopt.nnx.Optimizer(fresh, shardopt.adamw(1e-2), plan=plan(2))
    with shardopt.CheckpointManager(tmp_path) as ckpt:
        got = shardopt.nnx.restore(ckpt, fresh, fresh_opt)
    assert got.step == 3 and int(fresh_opt.step[...]) == 3
    jax.tree.map(np.testing.assert_array_equal, arrays(fresh), arrays(model))
    mu = fresh_opt.opt_state[0].mu["up"]["kernel"][...]
    np.testing.assert_array_equal(mu, optimizer.opt_state[0].mu["up"]["kernel"][...])
    assert mu.sharding.spec == PartitionSpec("data", "model")  # the new layout

    # onto an abstract model (nnx.eval_shape): nothing is initialised first
    with jax.set_mesh(MESH):
        abstract = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
    abstract_opt = shardopt.nnx.Optimizer(abstract, shardopt.adamw(1e-2), plan=plan(3))
    mu = abstract_opt.opt_state[0].mu["up"]["kernel"].get_value()
    assert isinstance(mu, jax.ShapeDtypeStruct)
    assert mu.sharding.spec == PartitionSpec("data", "model")
    with shardopt.CheckpointManager(tmp_path) as ckpt:
        shardopt.nnx.restore(ckpt, abstract, abstract_opt)
    jax.tree.map(np.testing.assert_array_equal, arrays(abstract), arrays(model))
    kernel = abstract.up.kernel[...]
    assert kernel.sharding.spec == PartitionSpec("data", "model")  # stage 3: FSDP
    assert int(abstract_opt.step[...]) == 3

    class Other(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(16, 8, rngs=rngs)

    other = Other(nnx.Rngs(0))
    with (
        shardopt.CheckpointManager(tmp_path) as ckpt,
        pytest.raises(CheckpointMismatchError, match="up/kernel"),
    ):
        shardopt.nnx.restore(ckpt, other)


def test_unannotated_model_is_warned_about_once_and_trains():
    with pytest.warns(shardopt.nnx.UnannotatedModelWarning, match="stage 1"):
        model, optimizer, losses = train(
            lambda m: shardopt.nnx.Optimizer(m, shardopt.adamw(1e-2), plan=plan(1)),
            annotated=False,
        )
    assert losses[-1] < losses[0]
    # the plan's default: replicated parameters, state partitioned over 'data'
    assert model.up.kernel[...].sharding.is_fully_replicated
    mu = optimizer.opt_state[0].mu["up"]["kernel"][...]
    assert mu.sharding.spec == PartitionSpec(None, "data")
    with warnings.catch_warnings():  # no plan, nothing to say
        warnings.simplefilter("error")
        shardopt.nnx.Optimizer(make_model(annotated=False), shardopt.sgd(0.1))


def test_annotation_naming_an_axis_the_mesh_lacks():
    model = make_model()
    other = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match=r"\['down'\]\['kernel'\].*no axis 'model'"):
        shardopt.nnx.Optimizer(model, shardopt.sgd(0.1), plan=shardopt.zero(1, other))


def test_optimizer_sharding_metadata_sets_the_state_layout():
    model = make_model()
    model.up.kernel.set_metadata(optimizer_sharding=(None, ("data", "model")))
    optimizer = shardopt.nnx.Optimizer(model, shardopt.adam(1e-2), plan=plan(1))
    mu = optimizer.opt_state[0].mu
    assert mu["up"]["kernel"][...].sharding.spec == PartitionSpec(
        None, ("data", "model")
    )
    assert mu["down"]["kernel"][...].sharding.spec == PartitionSpec("model", "data")


def test_explicit_mesh_axes():
    # jax.make_mesh's default: Explicit axes (the plan uses reshard there)
    mesh = jax.make_mesh((8,), ("data",))
    x = jax.device_put(X, NamedSharding(mesh, PartitionSpec("data")))
    results = []
    for stage in (0, 2):
        with jax.set_mesh(mesh):
            model = MLP(nnx.Rngs(0), annotated=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", shardopt.nnx.UnannotatedModelWarning)
            plan = shardopt.zero(stage, mesh, min_size=64)
            optimizer = shardopt.nnx.Optimizer(model, shardopt.adamw(1e-2), plan=plan)
        with jax.set_mesh(mesh):
            losses = [float(train_step(model, optimizer, x, Y)) for _ in range(2)]
        results.append((losses, arrays(model)))
    mu = optimizer.opt_state[0].mu["up"]["kernel"][...]
    assert mu.sharding.spec == PartitionSpec(None, "data")
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
    jax.tree.map(close, results[1][1], results[0][1])


def test_transform_with_a_python_function_leaf():
    # MultiSteps' every_k_schedule may be a plain function: it stays static
    model = make_model()
    tx = shardopt.MultiSteps(shardopt.sgd(0.1), every_k_schedule=lambda step: 2)
    optimizer = shardopt.nnx.Optimizer(model, tx, plan=plan(1))
    before = arrays(model)
    with jax.set_mesh(MESH):
        train_step(model, optimizer, X, Y)
        jax.tree.map(np.testing.assert_array_equal, arrays(model), before)
        train_step(model, optimizer, X, Y)  # the second mini-step applies
    assert not np.array_equal(arrays(model)["up"]["kernel"], before["up"]["kernel"])
    assert optimizer.to_shardopt().transform.every_k_schedule(0) == 2


def test_set_hyperparameters_in_place():
    model = make_model()
    optimizer = shardopt.nnx.Optimizer(model, shardopt.adam(1e-2), plan=plan(1))
    optimizer.set_hyperparameters(learning_rate=0.0)
    before = arrays(model)
    with jax.set_mesh(MESH):
        train_step(model, optimizer, X, Y)
    jax.tree.map(np.testing.assert_array_equal, arrays(model), before)
    assert int(optimizer.step[...]) == 1  # the state moved on
    with pytest.raises(ValueError, match="no hyperparameter named 'lr'"):
        optimizer.set_hyperparameters(lr=1.0)
