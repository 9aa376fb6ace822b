"""The optimizer table against optax, plus what every optimizer must guarantee."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from optimizer_table import (
    BF16_RTOL,
    ROWS,
    STEPS,
    make_params,
    relative_difference,
    run_oracle,
    run_ours,
)

import shardopt

NAMES = [row.name for row in ROWS]
ROWS_BY_NAME = {row.name: row for row in ROWS}


@functools.cache
def ours(name):
    return run_ours(ROWS_BY_NAME[name])


@pytest.mark.parametrize("name", NAMES)
def test_matches_optax(name):
    row = ROWS_BY_NAME[name]
    run = ours(name)
    oracle = run_oracle(row)
    differences = relative_difference(run.params, oracle)
    for leaf, difference in differences.items():
        bound = BF16_RTOL if oracle[leaf].dtype == jnp.bfloat16 else row.rtol
        assert difference <= bound, (leaf, differences)


@pytest.mark.parametrize("name", NAMES)
def test_compiles_once(name):
    # The first step compiles (or reuses an identical earlier row); no later step.
    assert ours(name).compilations <= 1


@pytest.mark.parametrize("name", NAMES)
def test_dtypes_and_state_structure_are_stable(name):
    run = ours(name)
    assert run.final.count == STEPS
    assert jax.tree.structure(run.final) == jax.tree.structure(run.initial)
    dtypes = lambda tree: jax.tree.map(
        lambda x: x.dtype, eqx.filter(tree, eqx.is_array)
    )
    assert dtypes(run.final) == dtypes(run.initial)
    assert dtypes(run.params) == dtypes(make_params())


@pytest.mark.parametrize("name", NAMES)
def test_init_on_shape_dtype_structs(name):
    params = make_params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    expected = shardopt.Optimizer(ROWS_BY_NAME[name].ours(), params)
    got = shardopt.Optimizer(ROWS_BY_NAME[name].ours(), abstract)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    got_leaves = jax.tree.leaves((got.state, got.count))
    expected_leaves = jax.tree.leaves((expected.state, expected.count))
    for g, e in zip(got_leaves, expected_leaves, strict=True):
        assert isinstance(g, jax.ShapeDtypeStruct)
        assert (g.shape, g.dtype) == (e.shape, e.dtype)
