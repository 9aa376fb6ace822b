"""optax 0.2.8's remaining schedules: the same numbers, leaves that never recompile."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shardopt

COUNTS = jnp.arange(0, 220, dtype=jnp.int32)

CYCLES = [
    dict(
        init_value=0.0, peak_value=1.0, warmup_steps=5, decay_steps=30, end_value=0.01
    ),
    dict(init_value=0.1, peak_value=0.5, warmup_steps=0, decay_steps=40, exponent=2.0),
    dict(init_value=0.0, peak_value=0.2, warmup_steps=10, decay_steps=25),
]

# (name, arguments shared by shardopt's and optax's constructor of that name);
# every case covers all its phases within COUNTS, and the steps after the last.
CASES = [
    ("piecewise_interpolate_schedule", ("linear", 1.0, {10: 0.5, 40: 0.1, 90: 2.0})),
    ("piecewise_interpolate_schedule", ("cosine", 2.0, {0: 0.5, 30: 3.0, 31: 0.0})),
    ("piecewise_interpolate_schedule", ("cosine", 0.7, None)),
    ("linear_onecycle_schedule", (100, 1e-3)),
    ("linear_onecycle_schedule", (97, 0.3, 0.25, 0.6, 10.0, 100.0)),
    ("linear_onecycle_schedule", (50, 2.0, 0.5, 0.5)),  # two phases end together
    ("cosine_onecycle_schedule", (100, 1e-3)),
    ("cosine_onecycle_schedule", (113, 0.7, 0.1, 3.0, 7.0)),
    ("cosine_onecycle_schedule", (40, 1.0, 1.0)),  # no annealing phase
    ("sgdr_schedule", (CYCLES,)),
    ("sgdr_schedule", (CYCLES[:1],)),
    ("warmup_constant_schedule", (0.1, 1.0, 20)),
    ("warmup_constant_schedule", (2.0, 0.0, 1)),
    ("warmup_exponential_decay_schedule", (0.0, 1.0, 10, 7, 0.8, 5, True, 0.05)),
    ("warmup_exponential_decay_schedule", (0.5, 1.0, 0, 9, 1.1, 0, False, 3.0)),
    ("warmup_exponential_decay_schedule", (0.0, 3e-3, 25, 10, 0.5)),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def optax_values(schedule):
    # Compiled as ours is, so that both round the same way (XLA fuses
    # multiply-adds under jit): what is left is the schedules' own arithmetic.
    with jax.numpy_dtype_promotion("standard"):
        return jax.jit(jax.vmap(schedule))(COUNTS).astype(jnp.float32)


@pytest.mark.parametrize("name, args", CASES, ids=IDS)
def test_matches_optax_at_every_step(name, args):
    ours = getattr(shardopt, name)(*args)
    assert isinstance(ours, shardopt.AbstractSchedule)
    got = jax.jit(jax.vmap(ours))(COUNTS)
    assert got.dtype == jnp.float32
    expected = optax_values(getattr(optax, name)(*args))
    # The one-cycle start value is peak / div_factor in float32 here, rounded
    # from float64 in optax: at most 3e-7 apart.
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


EAGER = (0, 3, 6, 9, 11, 13)  # one case of each schedule


@pytest.mark.parametrize(
    "name, args", [CASES[i] for i in EAGER], ids=[IDS[i] for i in EAGER]
)
def test_eager_values_match_optax(name, args):
    ours = getattr(shardopt, name)(*args)
    oracle = getattr(optax, name)(*args)
    for count in (0, 7, 33, 95, 219):
        with jax.numpy_dtype_promotion("standard"):
            expected = jnp.asarray(oracle(jnp.int32(count)), jnp.float32)
        np.testing.assert_allclose(
            ours(jnp.int32(count)), expected, rtol=1e-6, atol=1e-7
        )


# a leaf each test changes, and the value it becomes
CHANGES = {
    "piecewise_interpolate_schedule": (lambda s: s.init_value, 3.0),
    "linear_onecycle_schedule": (lambda s: s.peak_value, 5e-3),
    "cosine_onecycle_schedule": (lambda s: s.div_factor, 10.0),
    "sgdr_schedule": (lambda s: s.schedules[1].schedules[1].init_value, 0.9),
    "warmup_constant_schedule": (lambda s: s.peak_value, 0.25),
    "warmup_exponential_decay_schedule": (lambda s: s.decay_rate, 0.5),
}
FIRST_CASE = {name: args for name, args in reversed(CASES)}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_changing_a_number_does_not_recompile(name):
    traces = []

    @eqx.filter_jit
    def evaluate(schedule, counts):
        traces.append(None)
        return jax.vmap(schedule)(counts)

    args = FIRST_CASE[name]
    schedule = getattr(shardopt, name)(*args)
    before = evaluate(schedule, COUNTS)
    where, value = CHANGES[name]
    changed = eqx.tree_at(where, schedule, jnp.float32(value))
    after = evaluate(changed, COUNTS)
    assert not np.array_equal(before, after)
    assert len(traces) == 1


def test_rebuilt_with_other_step_counts_does_not_recompile():
    traces = []

    @eqx.filter_jit
    def evaluate(schedule, count):
        traces.append(None)
        return schedule(count)

    schedules = [
        shardopt.linear_onecycle_schedule(100, 1e-3),
        shardopt.linear_onecycle_schedule(300, 2e-3, pct_start=0.1, pct_final=0.5),
        shardopt.cosine_onecycle_schedule(100, 1e-3),
        shardopt.cosine_onecycle_schedule(77, 1e-1, pct_start=0.5),
        shardopt.warmup_exponential_decay_schedule(0.0, 1.0, 10, 7, 0.8),
        shardopt.warmup_exponential_decay_schedule(0.1, 2.0, 0, 70, 0.9),
        shardopt.sgdr_schedule(CYCLES[:2]),
        shardopt.sgdr_schedule([dict(CYCLES[0], decay_steps=99), *CYCLES[1:2]]),
    ]
    for schedule in schedules:
        evaluate(schedule, jnp.int32(3))
    assert len(traces) == 4  # one per kind of schedule


def test_the_numbers_are_leaves():
    schedule = shardopt.warmup_exponential_decay_schedule(0.0, 1.0, 10, 7, 0.8, 5)
    leaves = jax.tree.leaves(schedule)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert len(leaves) == 6  # init, peak, warmup, transition steps, rate, begin


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: shardopt.piecewise_interpolate_schedule("cubic", 1.0),
            "interpolate_type must be 'linear' or 'cosine', got 'cubic'",
        ),
        (
            lambda: shardopt.piecewise_interpolate_schedule("linear", 1.0, {5: -0.5}),
            r"boundaries_and_scales\[5\] = -0.5",
        ),
        (
            lambda: shardopt.piecewise_interpolate_schedule("linear", 1.0, {-3: 0.5}),
            "boundary -3 must be >= 0, got -3",
        ),
        (
            lambda: shardopt.piecewise_interpolate_schedule("linear", 1.0, {2.5: 0.5}),
            "boundary 2.5 must be an integer",
        ),
        (
            lambda: shardopt.piecewise_interpolate_schedule("linear", float("inf")),
            "init_value must be finite",
        ),
        (
            lambda: shardopt.linear_onecycle_schedule(0, 1e-3),
            "transition_steps must be > 0, got 0",
        ),
        (
            lambda: shardopt.cosine_onecycle_schedule(-5, 1e-3),
            "transition_steps must be > 0, got -5",
        ),
        (
            lambda: shardopt.cosine_onecycle_schedule(10.5, 1e-3),
            "transition_steps must be an integer number of steps, got 10.5",
        ),
        (
            lambda: shardopt.cosine_onecycle_schedule(100, 1e-3, pct_start=1.5),
            r"pct_start must be in \[0, 1\], got 1.5",
        ),
        (
            lambda: shardopt.linear_onecycle_schedule(100, 1e-3, 0.6, 0.5),
            "pct_start must be <= pct_final, got pct_start=0.6 and pct_final=0.5",
        ),
        (
            lambda: shardopt.linear_onecycle_schedule(100, 1e-3, div_factor=0.0),
            "div_factor must be > 0, got 0.0",
        ),
        (
            lambda: shardopt.cosine_onecycle_schedule(100, 1e-3, final_div_factor=-1),
            "final_div_factor must be > 0, got -1",
        ),
        (
            lambda: shardopt.warmup_constant_schedule(0.0, 1.0, 0),
            "warmup_steps must be > 0, got 0",
        ),
        (
            lambda: shardopt.warmup_exponential_decay_schedule(0.0, 1.0, -1, 5, 0.9),
            "warmup_steps must be >= 0, got -1",
        ),
        (
            lambda: shardopt.warmup_exponential_decay_schedule(0.0, 1.0, 5, 0, 0.9),
            "transition_steps must be > 0, got 0",
        ),
        (
            lambda: shardopt.warmup_exponential_decay_schedule(0.0, 1.0, 5, 5, 0.0),
            "decay_rate must be > 0, got 0.0",
        ),
        (
            lambda: shardopt.warmup_exponential_decay_schedule(0.0, 1.0, 5, 5, 0.9, -2),
            "transition_begin must be >= 0, got -2",
        ),
        (
            lambda: shardopt.warmup_exponential_decay_schedule(
                0.0, 1.0, 5, 5, 0.9, end_value=float("nan")
            ),
            "end_value must be finite",
        ),
        (lambda: shardopt.sgdr_schedule([]), "cosine_kwargs must hold at least one"),
        (
            lambda: shardopt.sgdr_schedule(
                [CYCLES[0], dict(CYCLES[2], decay_steps=10)]
            ),
            r"cosine_kwargs\[1\] decay_steps must be > its warmup_steps \(10\).*got 10",
        ),
        (
            lambda: shardopt.sgdr_schedule([dict(CYCLES[0], warmup_steps=-4)]),
            r"cosine_kwargs\[0\] warmup_steps must be >= 0, got -4",
        ),
    ],
)
def test_bad_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_sgdr_cycle_that_is_not_a_cycle():
    with pytest.raises(TypeError, match=r"cosine_kwargs\[0\] does not fit"):
        shardopt.sgdr_schedule([dict(CYCLES[0], decay_step=3)])
    with pytest.raises(TypeError, match=r"cosine_kwargs\[0\] must be a dict"):
        shardopt.sgdr_schedule([(0.0, 1.0, 5, 30)])


def test_sgdr_takes_any_iterable():
    cycles = iter(CYCLES)
    got = jax.jit(jax.vmap(shardopt.sgdr_schedule(cycles)))(COUNTS)
    expected = optax_values(optax.sgdr_schedule(CYCLES))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    steps=st.integers(1, 400),
    peak=st.floats(1e-6, 10.0),
    pct_start=st.floats(0.0, 1.0),
    extra=st.floats(0.0, 1.0),
    div=st.floats(1.0, 100.0),
    final=st.floats(1.0, 1e5),
    count=st.integers(0, 500),
)
def test_linear_onecycle_matches_optax_anywhere(
    steps, peak, pct_start, extra, div, final, count
):
    pct_final = pct_start + (1 - pct_start) * extra
    args = (steps, peak, pct_start, pct_final, div, final)
    got = shardopt.linear_onecycle_schedule(*args)(jnp.int32(count))
    with jax.numpy_dtype_promotion("standard"):
        expected = optax.linear_onecycle_schedule(*args)(jnp.int32(count))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-9 * peak)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    boundaries=st.lists(st.integers(0, 300), min_size=0, max_size=5, unique=True),
    scales=st.lists(st.floats(0.0, 4.0), min_size=5, max_size=5),
    kind=st.sampled_from(["linear", "cosine"]),
    count=st.integers(0, 400),
)
def test_piecewise_interpolate_matches_optax_anywhere(boundaries, scales, kind, count):
    table = dict(zip(boundaries, scales, strict=False))
    got = shardopt.piecewise_interpolate_schedule(kind, 0.5, table)(jnp.int32(count))
    with jax.numpy_dtype_promotion("standard"):
        expected = optax.piecewise_interpolate_schedule(kind, 0.5, table)(
            jnp.int32(count)
        )
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
