"""A dtype for every moment: storage dtypes that are floating, arithmetic in
float32 with one rounding when stored, and the bytes saved per device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import shardopt
from shardopt.sharding._memory import measure_memory


@functools.cache
def mesh8():
    return Mesh(np.array(jax.devices()), ("data",))


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda d: shardopt.adam(1e-3, mu_dtype=d), "mu_dtype"),
        (lambda d: shardopt.adamw(1e-3, nu_dtype=d), "nu_dtype"),
        (lambda d: shardopt.nadam(1e-3, nu_dtype=d), "nu_dtype"),
        (lambda d: shardopt.sgd(1e-3, 0.9, accumulator_dtype=d), "accumulator_dtype"),
        (lambda d: shardopt.lion(1e-3, mu_dtype=d), "mu_dtype"),
        (lambda d: shardopt.rmsprop(1e-3, nu_dtype=d), "nu_dtype"),
        (
            lambda d: shardopt.rmsprop(1e-3, centered=True, mu_dtype=d),
            "mu_dtype",
        ),
        (lambda d: shardopt.adagrad(1e-3, accumulator_dtype=d), "accumulator_dtype"),
        (lambda d: shardopt.amsgrad(1e-3, nu_dtype=d), "nu_dtype"),
        (lambda d: shardopt.adabelief(1e-3, nu_dtype=d), "nu_dtype"),
        (lambda d: shardopt.yogi(1e-3, nu_dtype=d), "nu_dtype"),
        (lambda d: shardopt.radam(1e-3, nu_dtype=d), "nu_dtype"),
        (lambda d: shardopt.adamax(1e-3, nu_dtype=d), "nu_dtype"),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.int32, "int8", bool, "bfloat17"])
def test_a_dtype_that_is_not_floating_names_the_argument(build, argument, dtype):
    with pytest.raises(TypeError, match=f"{argument} must be a floating dtype"):
        build(dtype)


def test_rmsprop_dtypes_need_the_state_they_name():
    with pytest.raises(ValueError, match="only with centered=True"):
        shardopt.rmsprop(1e-3, mu_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="only when momentum is given"):
        shardopt.rmsprop(1e-3, accumulator_dtype=jnp.bfloat16)


BF16 = jnp.bfloat16
NARROW = [
    # (the narrow optimizer, the same in float32, the state fields stored narrow)
    (
        lambda: shardopt.adam(1e-2, nu_dtype=BF16),
        lambda: shardopt.adam(1e-2),
        lambda s: [s[0].nu],
    ),
    (
        lambda: shardopt.rmsprop(
            1e-2, centered=True, mu_dtype=BF16, nu_dtype=jnp.float16
        ),
        lambda: shardopt.rmsprop(1e-2, centered=True),
        lambda s: [s[0].mu, s[0].nu],
    ),
    (
        lambda: shardopt.rmsprop(1e-2, nu_dtype=BF16),
        lambda: shardopt.rmsprop(1e-2),
        lambda s: [s[0].nu],
    ),
    (
        lambda: shardopt.adagrad(1e-2, 0.125, accumulator_dtype=BF16),
        lambda: shardopt.adagrad(1e-2, 0.125),
        lambda s: [s[0].sum_of_squares],
    ),
    (
        lambda: shardopt.amsgrad(1e-2, nu_dtype=BF16),
        lambda: shardopt.amsgrad(1e-2),
        lambda s: [s[0].nu, s[0].nu_max],
    ),
    (
        lambda: shardopt.adabelief(1e-2, nu_dtype=BF16),
        lambda: shardopt.adabelief(1e-2),
        lambda s: [s[0].nu],
    ),
    (
        lambda: shardopt.scale_by_yogi(
            initial_accumulator_value=2.0**-20, nu_dtype=BF16
        ),
        lambda: shardopt.scale_by_yogi(initial_accumulator_value=2.0**-20),
        lambda s: [s.nu],
    ),
    (
        lambda: shardopt.radam(1e-2, nu_dtype=BF16),
        lambda: shardopt.radam(1e-2),
        lambda s: [s[0].nu],
    ),
    (
        lambda: shardopt.adamaxw(1e-2, nu_dtype=BF16),
        lambda: shardopt.adamaxw(1e-2),
        lambda s: [s[0].nu],
    ),
]


def _as_float32(state):
    narrow = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if x.dtype in narrow else x, state
    )


@pytest.mark.parametrize("narrow, wide, fields", NARROW)
def test_moments_computed_in_float32_and_stored_rounded(narrow, wide, fields):
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    tx_narrow, tx_wide = narrow(), wide()
    state = tx_narrow.init(params)
    for got, want in zip(fields(state), fields(tx_wide.init(params)), strict=True):
        assert got["w"].dtype != want["w"].dtype
        np.testing.assert_array_equal(got["w"].astype(jnp.float32), want["w"])
    for step in range(3):
        grads = {"w": jnp.linspace(0.3, -2.1, 12).reshape(3, 4) * (step + 1)}
        # float32 arithmetic from the stored values: the same update as the
        # float32 optimizer given the stored state widened, and the new state
        # is that optimizer's new state rounded once
        u_narrow, new = tx_narrow.update(grads, state, params)
        u_wide, want = tx_wide.update(grads, _as_float32(state), params)
        np.testing.assert_array_equal(u_narrow["w"], u_wide["w"])
        for got, wide_field in zip(fields(new), fields(want), strict=True):
            np.testing.assert_array_equal(
                got["w"], wide_field["w"].astype(got["w"].dtype)
            )
        assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(
            lambda x: x.dtype, state
        )
        state = new


def test_memory_report_shows_the_bfloat16_nu_saving():
    mesh = mesh8()
    params = {"w": jnp.zeros((64, 16)), "b": jnp.zeros((16,))}
    plan = shardopt.zero(1, mesh, min_size=0)
    full = shardopt.memory_report(plan, params, shardopt.adam(1e-3))
    half = shardopt.memory_report(
        plan, params, shardopt.adam(1e-3, nu_dtype="bfloat16")
    )
    nu = {k: v[0] for k, v in half.per_leaf().items() if ".nu" in k[1]}
    # ZeRO-1 on 8 devices: each device holds 1/8 of each moment
    assert nu == {
        ("state", "[0].nu['b']"): 16 * 2 // 8,
        ("state", "[0].nu['w']"): 64 * 16 * 2 // 8,
    }
    saving = (64 * 16 + 16) * (4 - 2) // 8  # 260 bytes a device
    assert all(
        f - h == saving
        for f, h in zip(full.totals()["state"], half.totals()["state"], strict=True)
    )
    assert half.totals()["state"] == (4 * (64 * 16 + 16) // 8 + 260 + 4 + 4 + 4,) * 8
    # the live arrays hold what the report predicts
    opt = shardopt.Optimizer(
        shardopt.adam(1e-3, nu_dtype=jnp.bfloat16), plan.shard_params(params), plan=plan
    )
    assert measure_memory(mesh, opt=opt).totals()["state"] == half.totals()["state"]
