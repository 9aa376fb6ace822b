"""Adam's relatives: what the conformance table cannot express (bad input, warnings)."""

import re
import warnings

import jax.numpy as jnp
import pytest

import shardopt


def _quiet_optimistic_adam(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return shardopt.optimistic_adam(*args, **kwargs)


def _message(name, text, value):
    return re.escape(f"{name} must be {text}, got {value!r}")


UNIT = "in [0, 1)"
NONNEG = ">= 0"

BAD = [
    # (constructor, args, kwargs, argument, domain text, value)
    (shardopt.nadam, (1e-2,), {"b1": 1.0}, "b1", UNIT, 1.0),
    (shardopt.nadamw, (-1e-2,), {}, "learning_rate", NONNEG, -1e-2),
    (shardopt.adamax, (1e-2,), {"b2": -0.5}, "b2", UNIT, -0.5),
    (shardopt.adamax, (1e-2,), {"eps": -1e-8}, "eps", NONNEG, -1e-8),
    (shardopt.adamaxw, (1e-2,), {"b1": 1.5}, "b1", UNIT, 1.5),
    (shardopt.amsgrad, (1e-2,), {"eps_root": -1.0}, "eps_root", NONNEG, -1.0),
    (shardopt.amsgrad, (1e-2,), {"b2": 1.0}, "b2", UNIT, 1.0),
    (shardopt.adabelief, (1e-2,), {"eps": -1e-16}, "eps", NONNEG, -1e-16),
    (shardopt.adabelief, (1e-2,), {"b2": 2.0}, "b2", UNIT, 2.0),
    (shardopt.yogi, (1e-2,), {"b1": -0.1}, "b1", UNIT, -0.1),
    (shardopt.yogi, (1e-2,), {"eps": -1e-3}, "eps", NONNEG, -1e-3),
    (
        shardopt.scale_by_yogi,
        (),
        {"initial_accumulator_value": 0.0},
        "initial_accumulator_value",
        "> 0",
        0.0,
    ),
    (shardopt.radam, (1e-2,), {"b2": 1.0}, "b2", UNIT, 1.0),
    (shardopt.radam, (-1.0,), {}, "learning_rate", NONNEG, -1.0),
    (shardopt.novograd, (1e-2,), {"b2": 1.0}, "b2", UNIT, 1.0),
    (shardopt.novograd, (1e-2,), {"eps_root": -1e-6}, "eps_root", NONNEG, -1e-6),
    (shardopt.adan, (1e-2,), {"b3": 1.0}, "b3", UNIT, 1.0),
    (shardopt.adan, (1e-2,), {"b2": -0.9}, "b2", UNIT, -0.9),
    (shardopt.adan, (1e-2,), {"eps": -1.0}, "eps", NONNEG, -1.0),
    (
        shardopt.optimistic_gradient_descent,
        (1e-2,),
        {"alpha": -1.0},
        "alpha",
        NONNEG,
        -1.0,
    ),
    (
        shardopt.optimistic_gradient_descent,
        (1e-2,),
        {"beta": -0.5},
        "beta",
        NONNEG,
        -0.5,
    ),
    (shardopt.optimistic_adam_v2, (1e-2,), {"beta": -0.5}, "beta", NONNEG, -0.5),
    (shardopt.optimistic_adam_v2, (1e-2,), {"b1": 1.0}, "b1", UNIT, 1.0),
    (_quiet_optimistic_adam, (-1e-2,), {}, "learning_rate", NONNEG, -1e-2),
    (_quiet_optimistic_adam, (1e-2, -1.0), {}, "optimism", NONNEG, -1.0),
    (_quiet_optimistic_adam, (1e-2,), {"b2": 1.0}, "b2", UNIT, 1.0),
]


@pytest.mark.parametrize(
    ("make", "args", "kwargs", "name", "text", "value"),
    BAD,
    ids=[f"{make.__name__}-{name}" for make, _, _, name, _, _ in BAD],
)
def test_out_of_range_hyperparameter_names_it(make, args, kwargs, name, text, value):
    with pytest.raises(ValueError, match=_message(name, text, value)):
        make(*args, **kwargs)


def test_radam_threshold_must_be_finite():
    with pytest.raises(ValueError, match="threshold must be finite"):
        shardopt.radam(1e-2, threshold=float("inf"))


def test_optimistic_adam_is_deprecated_as_in_optax():
    with pytest.warns(DeprecationWarning, match="optimistic_adam_v2"):
        shardopt.optimistic_adam(1e-2)


def test_optimistic_adam_rejects_a_schedule():
    schedule = shardopt.linear_schedule(1e-2, 0.0, 10)
    with pytest.raises(ValueError, match="learning_rate must be a number"):
        _quiet_optimistic_adam(schedule)


def test_novograd_needs_the_parameters():
    params = {"w": jnp.ones((3, 2))}
    transform = shardopt.scale_by_novograd()
    state = transform.init(params)
    with pytest.raises(ValueError, match="scale_by_novograd needs the parameters"):
        transform.update(params, state)


def test_novograd_keeps_one_second_moment_per_leaf():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,), jnp.bfloat16)}
    state = shardopt.scale_by_novograd().init(params)
    assert state.nu["w"].shape == () and state.nu["w"].dtype == jnp.float32
    assert state.nu["b"].shape == () and state.nu["b"].dtype == jnp.bfloat16
