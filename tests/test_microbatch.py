"""microbatch: optax's numbers, the full batch's gradients, a partitioned carry."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt


def loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def data(n=32):
    kx, ky, kw = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(kw, (16, 8)), "b": jnp.zeros((8,))}
    return params, jax.random.normal(kx, (n, 16)), jax.random.normal(ky, (n, 8))


@pytest.mark.parametrize("kind", ["SUM", "MEAN", "RUNNING_MEAN"])
def test_matches_optax(kind):
    params, x, y = data()
    fun = jax.value_and_grad(loss)
    ours = shardopt.microbatch(fun, (1, 2), 8, shardopt.AccumulationType[kind])
    theirs = optax.microbatch(
        fun, (1, 2), 8, optax.microbatching.AccumulationType[kind]
    )
    for a, b in zip(
        jax.tree.leaves(jax.jit(ours)(params, x, y)),
        jax.tree.leaves(theirs(params, x, y)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_concat_keeps_batch_order_and_optax_enums_are_accepted():
    _, x, _ = data()
    fun = shardopt.microbatch(
        lambda x: (x * 2, jnp.sum(x)),
        0,
        4,
        (optax.microbatching.AccumulationType.CONCAT, "sum"),
    )
    doubled, total = fun(x)
    np.testing.assert_array_equal(doubled, x * 2)
    np.testing.assert_allclose(total, jnp.sum(x), rtol=1e-6)


def test_mean_of_microbatch_gradients_is_the_full_batch_gradient():
    params, x, y = data()
    grad = shardopt.microbatch(jax.grad(loss), (1, 2), 4, "mean")(params, x, y)
    want = jax.grad(loss)(params, x, y)
    for name in want:
        np.testing.assert_allclose(grad[name], want[name], rtol=1e-5, atol=1e-6)


def carry_shapes(hlo: str) -> list[str]:
    (loop,) = [line for line in hlo.splitlines() if " while(" in line]
    return re.findall(r"f32\[[\d,]*\]", loop.split("while(")[0])


def test_the_carry_is_partitioned_by_the_plan():
    params, x, y = data()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    plan = shardopt.zero(1, mesh, min_size=0)
    params = plan.shard_params(params)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    plain = jax.jit(shardopt.microbatch(jax.grad(loss), (1, 2), 8, "mean"))
    laid_out = jax.jit(
        shardopt.microbatch(
            jax.grad(loss),
            (1, 2),
            8,
            "mean",
            carry_shardings=plan.mirror_shardings(params),
        )
    )
    text = lambda f: f.lower(params, x, y).compile().as_text()
    # The loop carries the (replicated) parameter w, 16x8, and the accumulated
    # gradient of w: 16x8 on every device without a layout, 2x8 (1/8) with one.
    assert carry_shapes(text(plain)).count("f32[16,8]") == 2
    assert carry_shapes(text(laid_out)).count("f32[16,8]") == 1
    assert "f32[2,8]" in carry_shapes(text(laid_out))
    got = laid_out(params, x, y)
    assert got["w"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
    for name in got:
        np.testing.assert_allclose(got[name], plain(params, x, y)[name], rtol=1e-6)


def test_runs_inside_shard_map():
    params, x, y = data()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    grad = shardopt.microbatch(jax.grad(loss), (1, 2), 2, "mean")

    def local(params, x, y):
        # per-device parameters, so autodiff leaves the reduction to us
        params = jax.tree.map(lambda p: jax.lax.pcast(p, "data", to="varying"), params)
        return jax.lax.pmean(grad(params, x, y), "data")

    sharded = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()
        )
    )
    want = jax.grad(loss)(params, x, y)
    got = sharded(params, x, y)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"microbatch_size": 0}, "microbatch_size must be a positive int"),
        ({"microbatch_size": 5}, "batch size 32 is not divisible by microbatch_size=5"),
        ({"accumulator": "median"}, "accumulator must be an AccumulationType"),
        ({"in_axes": (0, 0, 0)}, "in_axes has 3 entries for 2 batch arguments"),
    ],
)
def test_bad_input(kwargs, message):
    params, x, y = data()
    arguments = {"microbatch_size": 8, "accumulator": "sum", **kwargs}
    with pytest.raises(ValueError, match=message):
        shardopt.microbatch(jax.grad(loss), (1, 2), **arguments)(params, x, y)
