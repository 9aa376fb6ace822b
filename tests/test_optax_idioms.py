"""optax's own idioms, run unchanged on shardopt transforms and on optax's.

Each idiom is written once and driven with a row of the conformance table from
each library: the numbers must agree as the table's parity test demands.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conformance import (
    BF16_RTOL,
    ROWS_BY_NAME,
    gradient,
    make_params,
    relative_difference,
)

import shardopt

STEPS = 4
# Several families: momentum, Adam with a masked decay, centred RMS with
# momentum, and a chain with a global-norm clip.
IDIOM_ROWS = [
    "sgd_momentum",
    "adamw_masked_exact_betas",
    "rmsprop_centered_momentum",
    "clip_by_global_norm_adam_exact_betas",
]


def apply(params, updates):
    return optax.apply_updates(params, updates)


def one_step(tx, params, state, step):
    updates, state = tx.update(gradient(params, step), state, params)
    return apply(params, updates), state


def idiom_jit_init_and_update(tx, params):
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    for step in range(STEPS):
        updates, state = update(gradient(params, step), state, params)
        params = apply(params, updates)
    return params


@functools.partial(jax.jit, static_argnums=0)
def _static_step(tx, params, state, step):
    return one_step(tx, params, state, step)


def idiom_static_argnums(tx, params):
    state = tx.init(params)
    for step in range(STEPS):
        params, state = _static_step(tx, params, state, step)
    return params


def idiom_closed_over(tx, params):
    @jax.jit
    def step_fn(params, state, step):
        return one_step(tx, params, state, step)

    state = tx.init(params)
    for step in range(STEPS):
        params, state = step_fn(params, state, step)
    return params


def idiom_scan(tx, params):
    def body(carry, step):
        return one_step(tx, *carry, step), None

    (params, _), _ = jax.jit(
        lambda p, s: jax.lax.scan(body, (p, s), jnp.arange(STEPS))
    )(params, tx.init(params))
    return params


IDIOMS = {
    "jit_init_and_update": idiom_jit_init_and_update,
    "static_argnums": idiom_static_argnums,
    "closed_over": idiom_closed_over,
    "scan": idiom_scan,
}


def assert_parity(row, ours, oracle):
    differences = relative_difference(ours, oracle)
    for leaf, difference in differences.items():
        bound = BF16_RTOL if oracle[leaf].dtype == jnp.bfloat16 else row.rtol
        assert difference <= bound, (leaf, differences)


@pytest.mark.parametrize("idiom", IDIOMS)
@pytest.mark.parametrize("name", IDIOM_ROWS)
def test_idiom_matches_optax(name, idiom):
    row = ROWS_BY_NAME[name]
    ours = IDIOMS[idiom](row.ours(), make_params())
    with jax.numpy_dtype_promotion("standard"):
        oracle = IDIOMS[idiom](row.oracle(), make_params())
    assert_parity(row, ours, oracle)


def test_static_argnums_compiles_once_per_value():
    """Equal hyperparameters share a compilation; another value compiles again."""
    params = make_params()
    state = shardopt.adam(1e-2).init(params)
    step = jax.jit(lambda tx, p, s: one_step(tx, p, s, 0), static_argnums=0)
    step(shardopt.adam(1e-2), params, state)
    step(shardopt.adam(1e-2), params, state)  # a new object, equal values
    assert step._cache_size() == 1
    step(shardopt.adam(2e-2), params, state)
    assert step._cache_size() == 2
    assert hash(shardopt.adam(1e-2)) == hash(shardopt.adam(1e-2))
    assert shardopt.adam(1e-2) == shardopt.adam(1e-2)


def batched_params(n=3):
    trees = [make_params(seed) for seed in range(n)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@pytest.mark.parametrize("name", IDIOM_ROWS)
def test_vmap_over_a_batch_of_states(name):
    row = ROWS_BY_NAME[name]

    def run(tx):
        @jax.jit  # one program: init, and every step's gradient and update
        def steps(params):
            states = jax.vmap(tx.init)(params)
            for step in range(STEPS):
                grads = jax.vmap(lambda p, s=step: gradient(p, s))(params)
                updates, states = jax.vmap(tx.update)(grads, states, params)
                params = apply(params, updates)
            return params

        return steps(batched_params())

    ours = run(row.ours())
    with jax.numpy_dtype_promotion("standard"):
        oracle = run(row.oracle())
    assert_parity(row, ours, oracle)
    # each member of the batch is the unbatched run of its own parameters
    single = idiom_closed_over(row.ours(), make_params(1))
    member = jax.tree.map(lambda x: x[1], ours)
    assert_parity(row, member, single)


# The learning rate as a traced argument, for meta-learning through an update.
BY_LEARNING_RATE = {
    "sgd_momentum": lambda lib, lr: lib.sgd(lr, momentum=0.9),
    "adam": lambda lib, lr: lib.adam(lr, 0.875, 1 - 2**-10),
    "adamw_masked": lambda lib, lr: lib.adamw(
        lr, 0.875, 1 - 2**-10, weight_decay=0.1, mask=lambda p: {k: True for k in p}
    ),
    "rmsprop": lambda lib, lr: lib.rmsprop(lr, centered=True, momentum=0.9),
    "lion": lambda lib, lr: lib.lion(lr),
}


def meta_loss(make, lr):
    """The loss after two steps taken with learning rate ``lr``."""
    params = make_params()
    tx = make(lr)
    state = tx.init(params)
    for step in range(2):
        params, state = one_step(tx, params, state, step)
    # float32 leaves only: bfloat16 rounding would dominate the comparison
    floats = [p for p in jax.tree.leaves(params) if p.dtype == jnp.float32]
    return sum(jnp.sum(p**2) for p in floats)


@pytest.mark.parametrize("name", BY_LEARNING_RATE)
def test_grad_through_an_update(name):
    make = BY_LEARNING_RATE[name]
    lr = jnp.float32(1e-2)
    ours = jax.jit(jax.grad(lambda lr: meta_loss(lambda r: make(shardopt, r), lr)))
    with jax.numpy_dtype_promotion("standard"):
        oracle = jax.jit(jax.grad(lambda lr: meta_loss(lambda r: make(optax, r), lr)))(
            lr
        )
    np.testing.assert_allclose(ours(lr), oracle, rtol=2e-5)
    # the same derivative, taken with respect to the transform's own field
    tx = make(shardopt, lr)
    by_field = eqx.filter_jit(
        eqx.filter_grad(lambda tx: meta_loss(lambda _: tx, None))
    )(tx)
    rates = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(by_field)
        if "learning_rate" in jax.tree_util.keystr(path)
    ]
    assert len(rates) == 1
    np.testing.assert_allclose(rates[0], oracle, rtol=2e-5)


@pytest.mark.parametrize("name", IDIOM_ROWS)
def test_init_on_shape_dtype_structs(name):
    tx = ROWS_BY_NAME[name].ours()
    params = make_params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    concrete = tx.init(params)
    for state in (jax.eval_shape(tx.init, abstract), tx.init(abstract)):
        assert jax.tree.structure(state) == jax.tree.structure(concrete)
        for got, want in zip(
            jax.tree.leaves(state), jax.tree.leaves(concrete), strict=True
        ):
            assert (got.shape, got.dtype) == (want.shape, want.dtype)
