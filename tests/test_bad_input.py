"""Grads that do not match the parameters are rejected, naming the leaf."""

import jax.numpy as jnp
import pytest

import shardopt

PARAMS = {
    "encoder": {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))},
    "scale": jnp.ones(()),
}


@pytest.fixture(scope="module")
def opt():
    return shardopt.Optimizer(shardopt.adam(1e-3), PARAMS)


def grads(**changes):
    tree = {
        "encoder": {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))},
        "scale": jnp.ones(()),
    }
    tree["encoder"].update(changes)
    return tree


def test_missing_leaf(opt):
    bad = grads()
    del bad["encoder"]["b"]
    with pytest.raises(ValueError, match=r"missing from grads: \['encoder'\]\['b'\]"):
        opt.step(PARAMS, bad)


def test_extra_leaf(opt):
    with pytest.raises(
        ValueError, match=r"not among the parameters: \['encoder'\]\['c'\]"
    ):
        opt.step(PARAMS, grads(c=jnp.ones(2)))


def test_wrong_shape_is_not_broadcast(opt):
    with pytest.raises(
        ValueError,
        match=r"\['encoder'\]\['b'\] is float32\[1\] but the parameter is float32\[3\]",
    ):
        opt.step(PARAMS, grads(b=jnp.ones((1,))))


def test_wrong_dtype(opt):
    with pytest.raises(ValueError, match=r"\['encoder'\]\['w'\] is bfloat16\[4,3\]"):
        opt.step(PARAMS, grads(w=jnp.ones((4, 3), jnp.bfloat16)))


def test_same_leaves_in_other_containers(opt):
    as_list = {"encoder": [jnp.ones((4, 3)), jnp.ones((3,))], "scale": jnp.ones(())}
    with pytest.raises(ValueError, match="not laid out like"):
        opt.step(PARAMS, as_list)


def test_not_a_transform():
    with pytest.raises(TypeError, match="needs a shardopt transform"):
        shardopt.Optimizer(lambda g: g, PARAMS)
    with pytest.raises(TypeError, match="chain argument 1"):
        shardopt.chain(shardopt.sgd(1.0), "adam")


def test_decay_needs_params():
    decay = shardopt.add_decayed_weights(1e-2)
    with pytest.raises(ValueError, match="needs the parameters"):
        decay.update(PARAMS, decay.init(PARAMS))
