"""Whole Equinox models: non-array leaves pass through, donation works, masks work."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import shardopt


def make_model():
    return eqx.nn.MLP(3, 2, width_size=8, depth=2, key=jax.random.key(0))


def loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


X = jax.random.normal(jax.random.key(1), (32, 3))
Y = jnp.stack([X[:, 0] - X[:, 1], X[:, 2] ** 2], axis=1)


@eqx.filter_jit(donate="all")
def train_step(model, opt, x, y):
    value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
    model, opt = opt.step(model, grads)
    return model, opt, value


def test_trains_an_equinox_model_with_donation():
    model = make_model()
    no_decay_on_biases = lambda m: jax.tree.map(lambda p: p.ndim == 2, m)
    opt = shardopt.Optimizer(shardopt.adamw(1e-2, mask=no_decay_on_biases), model)
    activation = model.activation
    first_weight = model.layers[0].weight
    losses = []
    for _ in range(30):
        model, opt, value = train_step(model, opt, X, Y)
        losses.append(float(value))
    assert first_weight.is_deleted()  # donated
    assert model.activation is activation  # non-array leaves pass through
    assert losses[-1] < 0.5 * losses[0]
    assert opt.count == 30
    # The masked weight decay keeps no state for biases: only 2-D leaves appear.
    decay_state = opt.state[1].inner_state
    assert isinstance(decay_state, shardopt.CountState)


def test_masked_state_is_none_where_the_mask_is_false():
    model = make_model()
    is_matrix = lambda m: jax.tree.map(lambda p: p.ndim == 2, m)
    transform = shardopt.masked(shardopt.trace(0.9), is_matrix)
    opt = shardopt.Optimizer(transform, model)
    trace = opt.state.inner_state.trace
    assert trace.layers[0].weight.shape == (8, 3)
    assert trace.layers[0].bias is None
    grads = jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_inexact_array))
    new_model, _ = opt.step(model, grads)
    # Unmasked (bias) updates pass through the masked transform unchanged: +1.
    np.testing.assert_array_equal(new_model.layers[0].bias, model.layers[0].bias + 1)


def test_abstract_model_gives_abstract_state():
    abstract = eqx.filter_eval_shape(make_model)
    opt = shardopt.Optimizer(shardopt.adam(1e-3), abstract)
    mu = opt.state[0].mu
    assert isinstance(mu.layers[1].weight, jax.ShapeDtypeStruct)
    assert mu.layers[1].weight.shape == (8, 8)


def test_functional_use_is_optax_style():
    params = {"w": jnp.ones(3)}
    transform = shardopt.chain(shardopt.clip(0.5), shardopt.sgd(0.1))
    state = transform.init(params)
    updates, state = transform.update({"w": jnp.full(3, 2.0)}, state, params)
    new = shardopt.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], 1 - 0.1 * 0.5)


# ---------------------------------------------------------------- under ZeRO
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from shardopt.checkpoint import CheckpointMismatchError  # noqa: E402

MESH = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
XS = jax.device_put(
    jax.random.normal(jax.random.key(3), (16, 3)),
    NamedSharding(MESH, PartitionSpec("data")),
)
YS = jnp.stack([XS[:, 0] - XS[:, 1], XS[:, 2] ** 2], axis=1)


def wide_model():
    return eqx.nn.MLP(3, 2, width_size=32, depth=2, key=jax.random.key(0))


def zero(stage):
    return shardopt.zero(stage, MESH, min_size=64)


def run(opt_fn, steps=3):
    model = wide_model()
    opt = opt_fn(model)
    if opt.plan is not None:
        model = opt.plan.shard_params(model)
    losses = []
    for _ in range(steps):
        model, opt, value = train_step(model, opt, XS, YS)
        losses.append(float(value))
    return model, opt, losses


def weights(model):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


@pytest.fixture(scope="module")
def eqx_stage0():
    return run(lambda m: shardopt.Optimizer(shardopt.adamw(1e-2), m, plan=zero(0)))


def test_same_optimizer_equals_optax_by_hand():
    # optax + Equinox as written today: filter, init, update, apply_updates
    model = wide_model()
    tx = optax.adamw(1e-2)
    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(eqx.filter(model, eqx.is_inexact_array))

        @eqx.filter_jit
        def optax_step(model, state, x, y):
            value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
            params = eqx.filter(model, eqx.is_inexact_array)
            updates, state = tx.update(grads, state, params)
            return eqx.apply_updates(model, updates), state, value

        for _ in range(3):
            model, state, _ = optax_step(model, state, XS, YS)
    got, _, _ = run(lambda m: shardopt.Optimizer(optax.adamw(1e-2), m))
    for a, b in zip(weights(got), weights(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_whole_model_every_stage_equals_stage_0(eqx_stage0, stage):
    model, opt, losses = run(
        lambda m: shardopt.Optimizer(shardopt.adamw(1e-2), m, plan=zero(stage))
    )
    np.testing.assert_allclose(losses, eqx_stage0[2], rtol=1e-6)
    for a, b in zip(weights(model), weights(eqx_stage0[0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert model.activation is eqx_stage0[0].activation  # non-arrays pass through
    mu = opt.state[0].mu.layers[1].weight
    assert mu.sharding.is_equivalent_to(NamedSharding(MESH, PartitionSpec("data")), 2)
    want = PartitionSpec("data") if stage == 3 else PartitionSpec()
    assert model.layers[1].weight.sharding.is_equivalent_to(
        NamedSharding(MESH, want), 2
    )


def test_whole_model_checkpoint_onto_another_stage(eqx_stage0, tmp_path):
    model, opt, _ = eqx_stage0
    with shardopt.CheckpointManager(tmp_path) as ckpt:
        ckpt.save(3, params=eqx.filter(model, eqx.is_array), opt=opt)
    like = wide_model()
    like_opt = shardopt.Optimizer(shardopt.adamw(1e-2), like, plan=zero(3))
    like = like_opt.plan.shard_params(like)
    with shardopt.CheckpointManager(tmp_path) as ckpt:
        got = ckpt.restore(params=eqx.filter(like, eqx.is_array), opt=like_opt)
    restored = eqx.combine(got.params, like)
    for a, b in zip(weights(restored), weights(model), strict=True):
        np.testing.assert_array_equal(a, b)
    held = restored.layers[1].weight.sharding
    assert held.is_equivalent_to(NamedSharding(MESH, PartitionSpec("data")), 2)
    assert int(got.opt.count) == 3
    other = eqx.nn.MLP(3, 2, width_size=8, depth=2, key=jax.random.key(0))
    with (
        shardopt.CheckpointManager(tmp_path) as ckpt,
        pytest.raises(CheckpointMismatchError, match="layers/0/weight"),
    ):
        ckpt.restore(params=eqx.filter(other, eqx.is_array))


class Net(eqx.Module):
    """A model with state: batch norm's running statistics in an eqx.nn.State."""

    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        # no bias before batch norm: its gradient is rounding noise, which Adam
        # would blow up into +-lr steps
        self.linear = eqx.nn.Linear(3, 32, use_bias=False, key=k1)
        self.norm = eqx.nn.BatchNorm(32, "batch", mode="batch")
        self.head = eqx.nn.Linear(32, 2, key=k2)

    def __call__(self, x, state):
        x, state = self.norm(self.linear(x), state)
        return self.head(jax.nn.relu(x)), state


def stateful_loss(model, state, x, y):
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    pred, state = batched(x, state)
    return jnp.mean((pred - y) ** 2), state


@eqx.filter_jit(donate="all")
def stateful_step(model, state, opt, x, y):
    grad_fn = eqx.filter_value_and_grad(stateful_loss, has_aux=True)
    (value, state), grads = grad_fn(model, state, x, y)
    model, opt = opt.step(model, grads)
    return model, state, opt, value


def test_stateful_model_batch_norm_under_zero():
    results = []
    for stage in (0, 3):
        model, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
        opt = shardopt.Optimizer(shardopt.adam(1e-2), model, plan=zero(stage))
        model = opt.plan.shard_params(model)
        losses = []
        for _ in range(3):
            model, state, opt, value = stateful_step(model, state, opt, XS, YS)
            losses.append(float(value))
        assert losses[-1] < losses[0]
        results.append((weights(model), weights(state), losses))
    (w0, s0, l0), (w3, s3, l3) = results
    np.testing.assert_allclose(l3, l0, rtol=1e-6)
    for a, b in zip(w3 + s3, w0 + s0, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def freeze_first_layer(model):
    """The documented pattern: a filter spec, True where a leaf is trained."""
    spec = jax.tree.map(eqx.is_inexact_array, model)
    return eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias), spec, replace=(False, False)
    )


@eqx.filter_jit(donate="all-except-first")
def frozen_step(frozen, trained, opt, x, y):
    def trained_loss(trained):
        return loss(eqx.combine(trained, frozen), x, y)

    value, grads = eqx.filter_value_and_grad(trained_loss)(trained)
    trained, opt = opt.step(trained, grads)
    return trained, opt, value


def test_freezing_part_of_a_model():
    model = wide_model()
    trained, frozen = eqx.partition(model, freeze_first_layer(model))
    opt = shardopt.Optimizer(shardopt.adamw(1e-2), trained, plan=zero(1))
    assert opt.state[0].mu.layers[0].weight is None  # no state for frozen leaves
    for _ in range(3):
        trained, opt, _ = frozen_step(frozen, trained, opt, XS, YS)
    model_after = eqx.combine(trained, frozen)
    np.testing.assert_array_equal(model_after.layers[0].weight, model.layers[0].weight)
    assert not np.array_equal(model_after.layers[1].weight, model.layers[1].weight)
    # gradients for the frozen layer are refused, naming it
    grads = eqx.filter_grad(loss)(model_after, XS, YS)
    with pytest.raises(ValueError, match=r"layers\[0\]\.weight"):
        opt.step(trained, grads)
