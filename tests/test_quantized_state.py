"""8-bit block-wise quantized state (shardopt.quantize_state, ``state_bits=8``).

Quantized state cannot meet the conformance table's 1e-6 against optax (it
stores 8 bits), so it is tested here: the map and round trip against a NumPy
reference, exact bytes in the memory report, bit-equal numbers under ZeRO
stages 0-3, one compilation, stable dtypes, a checkpoint round trip, and
convergence beside float32 AdamW.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

import shardopt
from shardopt.checkpoint import CheckpointManager

P = PartitionSpec
SHAPES = {"w1": (256, 512), "b1": (512,), "w2": (512, 256), "b2": (256,)}
N_PARAMS = sum(int(np.prod(s)) for s in SHAPES.values())  # 262,912
# for the runs: XLA:CPU here compiles without LLVM optimisations, and the 8-bit
# steps (a search of the 256-entry map per element) run slowly: keep small
SMALL = {"w1": (64, 32), "b1": (32,), "w2": (32, 64), "b2": (64,)}


def make_params(shapes=SHAPES):
    keys = jax.random.split(jax.random.key(0), len(shapes))
    return {
        name: jax.random.normal(k, shape, jnp.float32) * 0.05
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }


def loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def batch(i):
    kx = jax.random.fold_in(jax.random.key(1), i)
    x = jax.random.normal(kx, (16, 64), jnp.float32)
    return x, jnp.sin(x) * 0.5


TRACES = [0]


@eqx.filter_jit
def train_step(params, opt, x, y):
    TRACES[0] += 1  # Python side effect: runs once per compilation
    value, grads = jax.value_and_grad(loss)(params, x, y)
    params, opt = opt.step(params, grads)
    return params, opt, value


def mesh(n):
    return Mesh(np.array(jax.devices()[:n]), ("data",))


# --------------------------------------------------------- the map, round trip
def reference_quantize(x, block_size):
    """NumPy reference: per row, blocks along the last axis; nearest map value."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
    codes = np.zeros(rows.shape, np.uint8)
    nb = -(-rows.shape[1] // block_size)
    scales = np.zeros((rows.shape[0], nb), np.float32)
    signed_map = shardopt.dynamic_map(signed=True).astype(np.float64)
    unsigned_map = shardopt.dynamic_map(signed=False).astype(np.float64)
    for r, row in enumerate(rows):
        for b in range(nb):
            block = row[b * block_size : (b + 1) * block_size]
            absmax = np.max(np.abs(block))
            signed = bool(np.min(block) < 0)
            table = signed_map if signed else unsigned_map
            y = block / (absmax if absmax > 0 else np.float32(1))
            code = np.argmin(np.abs(y.astype(np.float64)[:, None] - table), axis=1)
            codes[r, b * block_size : (b + 1) * block_size] = code
            scales[r, b] = -absmax if signed else absmax
    return codes.reshape(x.shape), scales.reshape(*x.shape[:-1], nb)


def reference_dequantize(codes, scales, block_size):
    signed_map = shardopt.dynamic_map(signed=True)
    unsigned_map = shardopt.dynamic_map(signed=False)
    per_elem = np.repeat(scales, block_size, axis=-1)[..., : codes.shape[-1]]
    table = np.where(per_elem < 0, signed_map[codes], unsigned_map[codes])
    return table * np.abs(per_elem)


def test_dynamic_maps_follow_dettmers():
    signed = shardopt.dynamic_map(signed=True)
    unsigned = shardopt.dynamic_map(signed=False)
    for q in (signed, unsigned):
        assert q.shape == (256,) and q.dtype == np.float32
        assert np.all(np.diff(q) > 0) and q[-1] == 1.0 and 0.0 in q
    # signed: 127 negative, 0, 128 positive (bitsandbytes has 1 but not -1)
    assert (signed < 0).sum() == 127 and (signed > 0).sum() == 128
    assert unsigned[0] == 0.0
    # the smallest non-zero magnitudes: 10**-6 times the first midpoint of
    # [0.1, 1] split in 2 (unsigned) or 1 (signed) parts
    np.testing.assert_allclose(unsigned[1], 1e-6 * 0.325, rtol=1e-6)
    np.testing.assert_allclose(signed[128], 1e-6 * 0.55, rtol=1e-6)
    np.testing.assert_allclose(signed[-2], (1 + (1 - 0.9 / 64)) / 2, rtol=1e-6)


@pytest.mark.parametrize(
    "shape, block_size", [((6, 300), 64), ((1000,), 256), ((3, 4, 40), 16)]
)
def test_round_trip_matches_the_numpy_reference(shape, block_size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32) * 3.0
    x[..., :block_size] = np.abs(x[..., :block_size])  # unsigned blocks too
    x[0, ...] = 0.0  # all-zero blocks
    q = shardopt.quantize(jnp.asarray(x), block_size)
    codes, scales = reference_quantize(x, block_size)
    assert q.codes.dtype == jnp.uint8 and q.scales.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.scales), scales)
    back = np.asarray(shardopt.dequantize(q))
    np.testing.assert_array_equal(back, reference_dequantize(codes, scales, block_size))
    # error bound: half the widest gap of the map, times the block's absmax
    per_elem = np.repeat(np.abs(scales), block_size, axis=-1)[..., : shape[-1]]
    half_gap = max(
        np.max(np.diff(shardopt.dynamic_map(signed=s))) / 2 for s in (True, False)
    )
    assert np.all(np.abs(back - x) <= per_elem * half_gap * (1 + 1e-5))
    assert np.all(back[0] == 0.0)


@pytest.mark.parametrize("signed", [False, True])
def test_codes_at_and_beside_every_midpoint(signed):
    """The binary search gives the nearest value's code at the boundaries: a
    value at a midpoint goes down, the next float32 above it goes up."""
    table = shardopt.dynamic_map(signed=signed)
    mids = (table[:-1] + (table[1:] - table[:-1]) / 2).astype(np.float32)
    up, down = np.float32(np.inf), np.float32(-np.inf)
    y = np.concatenate([table, mids, np.nextafter(mids, up), np.nextafter(mids, down)])
    y = y[(y >= (-1 if signed else 0)) & (y <= 1)]
    width = 256 * -(-y.size // 256)
    x = np.zeros(width, np.float32)  # whole blocks, each with 1.0 (absmax 1)
    x[: y.size] = y
    x[::256] = 1.0
    if signed:
        x[1::256] = -1e-3  # every block signed
    q = shardopt.quantize(jnp.asarray(x), 256)
    want = np.searchsorted(mids, x, side="left")
    np.testing.assert_array_equal(np.asarray(q.codes), want)


# ------------------------------------------------------------- memory, layout
def state_bytes_by_hand(n_devices):
    """AdamW's quantized state on this model, per device, from its layout."""
    codes = 2 * N_PARAMS - 2 * (512 + 256)  # one byte per weight, two moments
    scales = 2 * 4 * (256 * 2 + 512 * 1)  # w1: 2 blocks a row, w2: 1
    biases = 2 * 4 * (512 + 256)  # below min_size: float32, replicated
    counts = 4 * 4  # the chain's three counts (adam, decay, lr), the Optimizer's
    return (codes + scales) // n_devices + biases + counts


@pytest.mark.parametrize("n_devices", [1, 8])
def test_adamw_state_bytes_are_reported_exactly(n_devices):
    plan = shardopt.zero(int(n_devices > 1), mesh(n_devices))
    tx = shardopt.adamw(1e-3, state_bits=8)
    params = plan.shard_params(make_params())
    opt = shardopt.Optimizer(tx, params, plan=plan)
    predicted = plan.memory_report(params, tx).totals()["state"]
    assert predicted == (state_bytes_by_hand(n_devices),) * n_devices
    measured = shardopt.sharding.measure_memory(plan.mesh, opt=opt).totals()["state"]
    assert measured == predicted
    if n_devices == 1:
        assert predicted[0] / N_PARAMS <= 2.1  # 2.05 (float32 state: 8)


def test_blocks_never_straddle_a_shard():
    shapes = {"wide": (8, 4096), "narrow": (16, 1024), "odd": (3, 1536)}
    params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    plan = shardopt.zero(1, mesh(8))
    tx = shardopt.quantize_state(shardopt.adam(1e-3), block_size=256)
    state = jax.eval_shape(tx.init, params)
    layout = {leaf.path: leaf for leaf in plan.state_layout(state, params)}
    # 4096 / 8 = 512: whole blocks in each shard, so the last axis is split
    assert layout["[0].mu['wide'].codes"].spec == P(None, "data")
    assert layout["[0].mu['wide'].scales"].spec == P(None, "data")
    # 1024 / 8 = 128 < 256: the rows are split instead
    assert layout["[0].nu['narrow'].codes"].spec == P("data", None)
    assert layout["[0].nu['narrow'].scales"].spec == P("data", None)
    # 1536 / 8 = 192 < 256, and 3 rows do not divide: kept whole, with the reason
    odd = layout["[0].mu['odd'].codes"]
    assert odd.spec == P(None, None) and "straddle" in odd.reason
    assert {leaf.kind for p, leaf in layout.items() if "codes" in p} == {"quantized"}


# ----------------------------------------------- stages, compilation, dtypes
@eqx.filter_jit
def grad_step(runs, grads):
    """One step of each (params, opt) pair: the stages' steps in one program."""
    TRACES[0] += 1
    return [opt.step(params, grads) for params, opt in runs]


def fixed_grads(i):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(2), i), len(SMALL))
    return {
        name: jax.random.normal(k, shape, jnp.float32) * 0.1
        for k, (name, shape) in zip(keys, SMALL.items(), strict=True)
    }


STAGES = (0, 1, 2, 3)


@functools.cache
def run(tx_name="adamw", stages=STAGES, n_steps=3):
    """``n_steps`` of ``tx_name`` with 8-bit state on fixed gradients (the same
    numbers whatever the layout: only the optimizer's own math runs), under
    each ZeRO stage of ``stages``: stage -> (params, opt, compilations)."""
    tx = {
        "adamw": lambda: shardopt.adamw(3e-3, state_bits=8),
        "lion": lambda: shardopt.lion(3e-4, state_bits=8),
        "sgd": lambda: shardopt.sgd(3e-2, momentum=0.9, state_bits=8),
    }[tx_name]()
    tx = shardopt.quantize_state(tx.inner, min_size=1024)  # SMALL's weights
    runs = []
    for stage in stages:
        plan = shardopt.zero(stage, mesh(8), min_size=0)
        params = plan.shard_params(make_params(SMALL))
        runs.append((params, shardopt.Optimizer(tx, params, plan=plan)))
    dtypes = [jax.tree.map(lambda x: x.dtype, opt.state) for _, opt in runs]
    before = TRACES[0]
    for i in range(n_steps):
        runs = grad_step(runs, fixed_grads(i))
        assert [jax.tree.map(lambda x: x.dtype, opt.state) for _, opt in runs] == (
            dtypes
        )
    compilations = TRACES[0] - before
    return {s: (*pair, compilations) for s, pair in zip(stages, runs, strict=True)}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_give_the_same_numbers(stage):
    want_params, want_opt, _ = run()[0]
    params, opt, compilations = run()[stage]
    assert compilations <= 1
    for got, want in zip(
        jax.tree.leaves((params, eqx.filter(opt, eqx.is_array))),
        jax.tree.leaves((want_params, eqx.filter(want_opt, eqx.is_array))),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert "data" in str(opt.state[0].mu["w1"].codes.sharding.spec)


@pytest.mark.parametrize("tx_name", ["lion", "sgd"])
def test_other_optimizers_step_with_stable_dtypes(tx_name):
    params, opt, compilations = run(tx_name, stages=(1,))[1]
    assert compilations <= 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    leaves = jax.tree.leaves(opt.state, is_leaf=lambda x: hasattr(x, "codes"))
    assert any(isinstance(x, shardopt.QuantizedArray) for x in leaves)


def test_checkpoint_round_trip_is_exact(tmp_path):
    params, opt, _ = run()[1]
    plan = shardopt.zero(1, mesh(8), min_size=0)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_params(SMALL)
    )
    tx = shardopt.quantize_state(shardopt.adamw(3e-3), min_size=1024)
    like = shardopt.Optimizer(tx, abstract, plan=plan)
    with CheckpointManager(tmp_path) as manager:
        manager.save(4, params=params, opt=opt)
        manager.wait()
        got = manager.restore(params=abstract, opt=like)
    for g, w in zip(
        jax.tree.leaves(eqx.filter(got.opt, eqx.is_array)),
        jax.tree.leaves(eqx.filter(opt, eqx.is_array)),
        strict=True,
    ):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ------------------------------------------------------------------ training
def test_converges_like_float32_adamw():
    finals = {}
    for bits in (None, 8):
        params = make_params(SMALL)
        tx = shardopt.adamw(3e-3)
        if bits:
            tx = shardopt.quantize_state(tx, min_size=1024)
        opt = shardopt.Optimizer(tx, params)
        for i in range(40):
            params, opt, value = train_step(params, opt, *batch(i % 4))
        finals[bits] = float(value)
    ratio = finals[8] / finals[None]
    print(f"final loss: float32 {finals[None]:.6f}, 8-bit {finals[8]:.6f}, {ratio=}")
    assert finals[None] < 0.5 * float(loss(make_params(SMALL), *batch(0)))
    assert abs(ratio - 1) < 0.02


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="state_bits"):
        shardopt.adamw(1e-3, state_bits=4)
    with pytest.raises(ValueError, match="block_size"):
        shardopt.quantize_state(shardopt.adam(1e-3), block_size=0)
    with pytest.raises(ValueError, match="min_size"):
        shardopt.quantize_state(shardopt.adam(1e-3), min_size=0)
