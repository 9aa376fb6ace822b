"""Matrix optimizers on a mesh: whole matrices assigned to devices, the same
numbers as unsharded, and the collectives of a step counted in compiled HLO."""

from __future__ import annotations

import collections
import functools
import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec

import shardopt
from shardopt.sharding import collectives, compiled_text

STEPS = 3


@functools.cache
def _drawn() -> dict[str, np.ndarray]:
    keys = jax.random.split(jax.random.key(0), 10)
    p = {f"w{i}": jax.random.normal(keys[i], (16, 8)) for i in range(5)}
    p |= {f"v{i}": jax.random.normal(keys[5 + i], (8, 16)) for i in range(3)}
    p["bias"] = jax.random.normal(keys[9], (16,))
    return jax.tree.map(np.asarray, p)


def model() -> dict[str, jax.Array]:
    """Five 16 x 8 and three 8 x 16 matrices (two stacks) and a bias (AdamW's)."""
    return jax.tree.map(jnp.asarray, _drawn())


def grads_at(params, step):
    return jax.tree.map(lambda p: jnp.sin(p * (step + 1.0)) + 0.1 * p, params)


@eqx.filter_jit
def _step(params, opt, step):
    return opt.step(params, grads_at(params, step))


def run(transform, params, plan=None, steps=STEPS):
    opt = shardopt.Optimizer(transform, params, plan=plan)
    for i in range(steps):
        params, opt = _step(params, opt, jnp.float32(i))
    return params, opt


OPTIMIZERS = {
    "muon": lambda: shardopt.muon(3e-2, beta=0.875),
    "shampoo": lambda: shardopt.shampoo(3e-2),
    "soap": lambda: shardopt.soap(1e-2, precondition_frequency=2),
}


@functools.cache
def unsharded(name):
    return run(OPTIMIZERS[name](), model())


# Muon's numbers match the unsharded run to float32 rounding. Shampoo's and
# SOAP's go through inverse roots and eigenbases of factors with eigenvalues
# near zero ((L + eps I)^(-1/4) multiplies rounding by eps^(-1/4) ~ 30): the
# one-device program and the 8-device one (XLA fuses each its own way) then
# differ by up to 8.6e-6 absolute on entries of size ~1 after 3 steps, at
# every stage alike; stages 1-3, which move whole matrices to devices, match
# stage 0 on the same mesh to float32 rounding.
LOOSE = {"shampoo": (2e-4, 2e-5), "soap": (2e-4, 2e-5)}


@functools.cache
def stage0(name):
    plan = shardopt.zero(0, mesh8(), min_size=0)
    return run(OPTIMIZERS[name](), plan.shard_params(model()), plan)


def assert_close(got, want, rtol=1e-6, atol=1e-7):
    got = jax.tree.leaves(eqx.filter(got, eqx.is_array))
    want = jax.tree.leaves(eqx.filter(want, eqx.is_array))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol
        )


def canonical_bases(state):
    """SOAP's state with each eigenvector's sign fixed (largest entry
    positive): an eigenbasis is defined up to the sign of each column, and two
    programs may pick different ones; the parameters do not depend on it."""

    def fix(q):  # on the host: an eager op on arrays of two layouts once
        # aborted XLA's SPMD partitioner (q stacked over devices, its signs not)
        q = np.asarray(q)
        if q.ndim < 2:
            return q
        rows = np.argmax(np.abs(q), axis=-2, keepdims=True)
        signs = np.sign(np.take_along_axis(q, rows, axis=-2))
        return q * np.where(signs == 0, 1, signs).astype(q.dtype)

    def one(node):
        if not isinstance(node, shardopt.SoapState):
            return node
        return eqx.tree_at(
            lambda s: (s.q_left, s.q_right),
            node,
            (jax.tree.map(fix, node.q_left), jax.tree.map(fix, node.q_right)),
        )

    is_soap = lambda x: isinstance(x, shardopt.SoapState)
    return jax.tree.map(one, state, is_leaf=is_soap)


def mesh8() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


@pytest.mark.parametrize("stage", (0, 1, 2, 3))
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_zero_stages_match_unsharded(name, stage):
    plan = shardopt.zero(stage, mesh8(), min_size=0)
    params, opt = run(OPTIMIZERS[name](), plan.shard_params(model()), plan)
    want_params, want_opt = unsharded(name)
    tolerance = LOOSE.get(name, (1e-6, 1e-7))
    assert_close(params, want_params, *tolerance)
    state = canonical_bases(opt.state)
    assert_close(state, canonical_bases(want_opt.state), *tolerance)
    if name in LOOSE and stage:
        same_mesh_params, same_mesh_opt = stage0(name)
        assert_close(params, same_mesh_params)
        assert_close(state, canonical_bases(same_mesh_opt.state))


def tensor_parallel_specs(params):
    """Columns of every matrix over 'model'; the bias replicated."""
    return {
        k: PartitionSpec(None, "model") if v.ndim == 2 else PartitionSpec()
        for k, v in params.items()
    }


@pytest.mark.parametrize("stage", (0, 3))
@pytest.mark.parametrize("axis_type", (AxisType.Auto, AxisType.Explicit))
def test_tensor_parallel_layout_matches_unsharded(stage, axis_type):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    params = model()
    specs = tensor_parallel_specs(params)
    params = {
        k: jax.device_put(v, jax.sharding.NamedSharding(mesh, specs[k]))
        for k, v in params.items()
    }
    plan = shardopt.zero(stage, mesh, min_size=0)
    params = plan.shard_params(params)
    got, opt = run(OPTIMIZERS["muon"](), params, plan)
    want_params, want_opt = unsharded("muon")
    assert_close(got, want_params)
    assert_close(opt.state, want_opt.state)
    for k, v in got.items():  # still in the model's own (tensor-parallel) layout
        assert "model" in str(v.sharding.spec) or v.ndim == 1, (k, v.sharding)


def step_collectives(transform, stage):
    """The collectives of one compiled step, gradients given in the plan's layout."""
    plan = shardopt.zero(stage, mesh8(), min_size=0)
    params = plan.shard_params(model())
    opt = shardopt.Optimizer(transform, params, plan=plan)
    grads = jax.tree.map(
        lambda x, s: jax.device_put(jnp.ones_like(x), s),
        params,
        plan.grad_shardings(params),
    )
    step = eqx.filter_jit(lambda p, o, g: o.step(p, g))
    return collectives(compiled_text(step, params, opt, grads))


# ZeRO's own traffic (stages 1-2 all-gather the 9 updates into the parameter
# layout, as for AdamW) plus, per stack of same-shape matrices, one all-to-all
# in (each device receives whole matrices, its share) and one out: 128
# elements per device each (8 slots of 16 x 8 = 128 elements, one a device).
MUON_COUNTS = {
    0: {},
    1: {"all-gather": 9, "all-to-all": 4},
    2: {"all-gather": 9, "all-to-all": 4},
    3: {"all-to-all": 4},
}


@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_muon_collectives_are_counted(stage):
    found = step_collectives(shardopt.muon(3e-2), stage)
    assert dict(collections.Counter(c.kind for c in found)) == MUON_COUNTS[stage]
    for c in found:
        if c.kind == "all-to-all":
            assert c.elements == 128, c
    adamw = step_collectives(shardopt.adamw(3e-2), stage)
    extra = collections.Counter(c.kind for c in found)
    extra.subtract(collections.Counter(c.kind for c in adamw))
    assert +extra == collections.Counter({"all-to-all": 4} if stage else {}), (
        "Muon adds exactly the two all-to-alls per stack to AdamW's traffic"
    )


# Shampoo moves the gradient, the grafting's moment and both factors in and
# the update, the moment and both factors out (4 + 4); SOAP the gradient,
# both moments, both factors and both eigenbases in, the same with the update
# for the gradient out (7 + 7); per stack of same-shape matrices (two here).
# Stages 1-2 add ZeRO's 9 update all-gathers.
SECOND_ORDER_ALL_TO_ALLS = {"shampoo": 16, "soap": 28}
# elements per device of each optimizer's all-to-alls, both stacks, in and
# out: a slot of a 16 x 8 matrix is 128, of its factors 256 and 64
SECOND_ORDER_ELEMENTS = {
    "shampoo": 2 * (4 * 128 + 2 * 256 + 2 * 64),
    "soap": 2 * (6 * 128 + 4 * 256 + 4 * 64),
}


@pytest.mark.parametrize("stage", (0, 1, 2, 3))
@pytest.mark.parametrize("name", ("shampoo", "soap"))
def test_second_order_collectives_are_counted(name, stage):
    found = step_collectives(OPTIMIZERS[name](), stage)
    want = {}
    if stage:
        want["all-to-all"] = SECOND_ORDER_ALL_TO_ALLS[name]
    if stage in (1, 2):
        want["all-gather"] = 9
    assert dict(collections.Counter(c.kind for c in found)) == want
    moved = sum(c.elements for c in found if c.kind == "all-to-all")
    assert moved == (SECOND_ORDER_ELEMENTS[name] if stage else 0)


def test_scale_by_muon_names_a_non_matrix_leaf():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    opt = shardopt.Optimizer(shardopt.scale_by_muon(), params)
    with pytest.raises(
        ValueError, match=r"\['b'\].*float32\[4\].*MuonDimensionNumbers"
    ):
        opt.step(params, params)


def test_muon_bad_arguments_are_named():
    with pytest.raises(ValueError, match="ns_coeffs must have shape"):
        shardopt.muon(1e-2, ns_coeffs=(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown ns_coeffs preset 'nope'"):
        shardopt.muon(1e-2, ns_coeffs="nope")
    with pytest.raises(ValueError, match="preconditioning must be one of"):
        shardopt.muon(1e-2, preconditioning="qr")
    with pytest.raises(ValueError, match="beta must be in"):
        shardopt.muon(1e-2, beta=1.5)


def test_shampoo_and_soap_name_a_non_matrix_leaf():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    for transform in (shardopt.scale_by_shampoo(), shardopt.scale_by_soap()):
        with pytest.raises(ValueError, match=r"\['b'\].*float32\[4\].*AdamW"):
            shardopt.Optimizer(transform, params)
    with pytest.raises(ValueError, match="precondition_frequency must be >= 1"):
        shardopt.soap(1e-2, precondition_frequency=0)


# ---------------------------------------------------------------- convergence
def _train(transform, loss, params, steps):
    opt = shardopt.Optimizer(transform, params)

    @eqx.filter_jit
    def many(params, opt):
        def body(carry, _):
            p, o = carry
            return o.step(p, jax.grad(loss)(p)), None

        return jax.lax.scan(body, (params, opt), None, length=steps)[0]

    params, _ = many(params, opt)
    return float(loss(params))


_RNG = np.random.default_rng(0)
_A = (_RNG.normal(size=(32, 8)) * np.logspace(0, 1.5, 8)).astype(np.float32)
_B = _RNG.normal(size=(32, 4)).astype(np.float32)


def quadratic(p):
    """Least squares with a condition number of about 10^3, and a bias."""
    residual = jnp.asarray(_A) @ p["w"] - jnp.asarray(_B)
    return 0.5 * jnp.mean(residual**2) + 0.5 * jnp.sum((p["b"] - 1.0) ** 2)


def rosenbrock(p):
    x, y = p["xy"][0, 0], p["xy"][0, 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def mlp_loss(p):
    x = jnp.asarray(_RNG_X)
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] + p["b2"] - jnp.asarray(_RNG_Y)) ** 2)


_RNG_X = _RNG.normal(size=(64, 4)).astype(np.float32)
_RNG_Y = np.sin(_RNG_X @ _RNG.normal(size=(4, 2))).astype(np.float32)


def mlp_params():
    rng = np.random.default_rng(1)
    return {
        "w1": jnp.asarray(rng.normal(size=(4, 16)) * 0.5, jnp.float32),
        "b1": jnp.zeros((16,), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(16, 2)) * 0.25, jnp.float32),
        "b2": jnp.zeros((2,), jnp.float32),
    }


SECOND_ORDER = {
    "shampoo": lambda lr: shardopt.shampoo(lr),
    "soap": lambda lr: shardopt.soap(lr, precondition_frequency=5),
}


@pytest.mark.parametrize(("name", "lr"), [("shampoo", 1e-1), ("soap", 3e-2)])
def test_converges_on_a_quadratic(name, lr):
    w, *_ = np.linalg.lstsq(_A, _B, rcond=None)
    optimum = float(quadratic({"w": jnp.asarray(w), "b": jnp.ones(4)}))
    start = {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}
    final = _train(SECOND_ORDER[name](lr), quadratic, start, 200)
    assert final <= optimum * 1.01 + 1e-4, (final, optimum)


@pytest.mark.parametrize(("name", "lr"), [("shampoo", 3e-2), ("soap", 1e-2)])
def test_converges_on_rosenbrock(name, lr):
    start = {"xy": jnp.asarray([[-1.0, 1.0]])}
    assert rosenbrock(start) == 4.0
    assert _train(SECOND_ORDER[name](lr), rosenbrock, start, 500) < 1e-3


@pytest.mark.parametrize("name", sorted(SECOND_ORDER))
def test_trains_a_small_mlp(name):
    start = float(mlp_loss(mlp_params()))
    final = _train(SECOND_ORDER[name](1e-2), mlp_loss, mlp_params(), 300)
    adam = _train(shardopt.adam(1e-2), mlp_loss, mlp_params(), 300)
    assert final < start / 10, (start, final)
    assert final < 2 * adam, (final, adam)  # in Adam's league on this problem


def test_docs_example_runs():
    text = (pathlib.Path(__file__).parent.parent / "docs" / "matrix.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/matrix.md", "exec"), {})


@pytest.mark.parametrize("name", ("shampoo", "soap"))
def test_checkpoint_round_trip_under_zero(tmp_path, name):
    from shardopt.checkpoint import CheckpointManager

    plan = shardopt.zero(1, mesh8(), min_size=0)
    params, opt = run(OPTIMIZERS[name](), plan.shard_params(model()), plan)
    abstract = plan.abstract_params(model())
    like = shardopt.Optimizer(OPTIMIZERS[name](), abstract, plan=plan)
    with CheckpointManager(tmp_path) as manager:
        manager.save(STEPS, params=params, opt=opt)
        manager.wait()
        got = manager.restore(params=abstract, opt=like)
    for g, w in zip(
        jax.tree.leaves(eqx.filter(got.opt, eqx.is_array)),
        jax.tree.leaves(eqx.filter(opt, eqx.is_array)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        assert g.sharding.is_equivalent_to(w.sharding, g.ndim)
