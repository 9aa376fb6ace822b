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
    with pytest.raises(
        TypeError, match=r"the Optimizer's transform must be .* got function"
    ):
        shardopt.Optimizer(lambda g: g, PARAMS)
    with pytest.raises(TypeError, match=r"chain argument 1 must be .* got str"):
        shardopt.chain(shardopt.sgd(1.0), "adam")
    with pytest.raises(TypeError, match=r"masked's inner transform must be .* got int"):
        shardopt.masked(3, {"w": True})


def test_decay_needs_params():
    decay = shardopt.add_decayed_weights(1e-2)
    with pytest.raises(ValueError, match="needs the parameters"):
        decay.update(PARAMS, decay.init(PARAMS))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: shardopt.adam(1e-3, b1=1.5), r"b1 must be in \[0, 1\), got 1.5"),
        (lambda: shardopt.adam(1e-3, b2=1.0), r"b2 must be in \[0, 1\), got 1.0"),
        (lambda: shardopt.adam(1e-3, eps=-1e-8), r"eps must be >= 0, got -1e-08"),
        (lambda: shardopt.sgd(-0.1), r"learning_rate must be >= 0, got -0.1"),
        (lambda: shardopt.sgd(0.1, momentum=1.2), r"decay must be in \[0, 1\)"),
        (lambda: shardopt.lion(1e-3, b2=-0.5), r"b2 must be in \[0, 1\)"),
        (lambda: shardopt.rmsprop(1e-3, decay=1.0), r"decay must be in \[0, 1\)"),
    ],
)
def test_hyperparameters_out_of_range(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_replaced_hyperparameter_is_validated_like_the_constructor():
    opt = shardopt.Optimizer(shardopt.adam(1e-3), PARAMS)
    with pytest.raises(ValueError, match=r"b1 must be in \[0, 1\), got 2.0"):
        opt.with_hyperparameters(b1=2.0)


def test_schedule_boundaries_must_increase():
    parts = [shardopt.constant_schedule(v) for v in (1.0, 0.5, 0.1)]
    with pytest.raises(ValueError, match=r"boundaries must increase, got \[20, 10\]"):
        shardopt.join_schedules(parts, [20, 10])
