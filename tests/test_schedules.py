"""Schedules against optax, and as Modules whose numbers change without recompiling."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shardopt

COUNTS = jnp.arange(0, 130, dtype=jnp.int32)

# name -> (arguments shared by shardopt's and optax's constructor of that name)
SCHEDULES = {
    "constant_schedule": (0.3,),
    "linear_schedule": (1.0, 0.1, 100, 10),
    "polynomial_schedule": (1.0, 0.1, 2.0, 100, 10),
    "cosine_decay_schedule": (2.0, 100, 0.1, 1.5),
    "warmup_cosine_decay_schedule": (0.0, 1.0, 10, 100, 1e-3),
    "exponential_decay": (1.0, 7, 0.8, 5, True, 0.05),
    "piecewise_constant_schedule": (1.0, {10: 0.5, 40: 0.1, 90: 2.0}),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_matches_optax(name):
    args = SCHEDULES[name]
    ours = getattr(shardopt, name)(*args)
    oracle = getattr(optax, name)(*args)
    got = jax.jit(jax.vmap(ours))(COUNTS)
    with jax.numpy_dtype_promotion("standard"):
        expected = jnp.stack([jnp.asarray(oracle(c), jnp.float32) for c in COUNTS])
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_join_schedules_matches_optax():
    parts = lambda lib: [
        lib.linear_schedule(0.0, 1.0, 20),
        lib.constant_schedule(1.0),
        lib.cosine_decay_schedule(1.0, 50),
    ]
    ours = shardopt.join_schedules(parts(shardopt), [20, 60])
    oracle = optax.join_schedules(parts(optax), [20, 60])
    with jax.numpy_dtype_promotion("standard"):
        expected = jnp.stack([jnp.asarray(oracle(c), jnp.float32) for c in COUNTS])
    np.testing.assert_allclose(jax.vmap(ours)(COUNTS), expected, rtol=1e-6, atol=1e-7)


def test_changing_a_schedule_value_does_not_recompile():
    traces = []

    @eqx.filter_jit
    def evaluate(schedule, count):
        traces.append(None)
        return schedule(count)

    schedule = shardopt.warmup_cosine_decay_schedule(0.0, 1.0, 10, 100)
    evaluate(schedule, jnp.int32(50))
    higher = eqx.tree_at(
        lambda s: s.schedules[1].init_value, schedule, jnp.float32(2.0)
    )
    assert evaluate(higher, jnp.int32(10)) == pytest.approx(2.0)
    assert len(traces) == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: shardopt.cosine_decay_schedule(1.0, 0), "decay_steps must be > 0"),
        (lambda: shardopt.linear_schedule(float("nan"), 0.0, 5), "init_value"),
        (
            lambda: shardopt.piecewise_constant_schedule(1.0, {5: -1.0}),
            "scales must be >= 0",
        ),
        (
            lambda: shardopt.join_schedules([shardopt.constant_schedule(1.0)], [3]),
            "one",
        ),
    ],
)
def test_bad_schedule_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    init=st.floats(0.0, 10.0),
    end=st.floats(0.0, 10.0),
    steps=st.integers(1, 500),
    begin=st.integers(0, 50),
    count=st.integers(0, 1000),
)
def test_linear_schedule_matches_optax_anywhere(init, end, steps, begin, count):
    ours = shardopt.linear_schedule(init, end, steps, begin)(jnp.int32(count))
    with jax.numpy_dtype_promotion("standard"):
        expected = optax.linear_schedule(init, end, steps, begin)(jnp.int32(count))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    peak=st.floats(1e-6, 1.0),
    warmup=st.integers(0, 100),
    decay=st.integers(1, 400),
    end_fraction=st.floats(0.0, 1.0),
    count=st.integers(0, 800),
)
def test_warmup_cosine_matches_optax_anywhere(peak, warmup, decay, end_fraction, count):
    args = (0.0, peak, warmup, warmup + decay, peak * end_fraction)
    ours = shardopt.warmup_cosine_decay_schedule(*args)(jnp.int32(count))
    with jax.numpy_dtype_promotion("standard"):
        expected = optax.warmup_cosine_decay_schedule(*args)(jnp.int32(count))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-7)
