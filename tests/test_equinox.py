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
