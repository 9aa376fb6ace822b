"""The matrix-wise family beyond the table: communication per step under ZeRO,
tensor-parallel layouts, where the factored state is placed, and bad input."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt import sharding as sh


@functools.cache
def mesh8():
    return Mesh(np.array(jax.devices()), ("data",))


@functools.cache
def mesh4x2():
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


def make_params():
    kw, kb = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(kw, (64, 32)), "b": jax.random.normal(kb, (32,))}


def make_grads(i=0):
    kw, kb = jax.random.split(jax.random.key(10 + i))
    return {"w": jax.random.normal(kw, (64, 32)), "b": jax.random.normal(kb, (32,))}


TRANSFORMS = {
    # 32: the (64, 32) matrix is factored, rows (1, 32) and columns (64, 1)
    "adafactor": lambda: shardopt.adafactor(1e-2, min_dim_size_to_factor=32),
    "sm3": lambda: shardopt.sm3(1e-2),
    "clip_by_block_rms": lambda: shardopt.chain(
        shardopt.clip_by_block_rms(0.5), shardopt.scale(-0.1)
    ),
    "adaptive_grad_clip": lambda: shardopt.chain(
        shardopt.adaptive_grad_clip(0.5), shardopt.scale(-0.1)
    ),
}

# ZeRO stage 1 on 8 devices, default min_size=1024: w (64, 32) is partitioned
# on dim 0 (8 rows a device), b (32,) is too small and stays replicated, so it
# costs nothing. The gradients arrive replicated and are sliced locally; the
# update of w is all-gathered back into the replicated parameter layout (the
# one all-gather, of (64, 32), common to every stage-1 step). What each entry
# adds, all-reduces of reductions over the partitioned dim 0:
COLLECTIVES = {
    # v_row = mean over dim 0 (the (1, 32) row statistic); the parameter
    # scale's two dependent scalar sums of w**2 (scale_by_param_block_rms
    # computes its RMS twice so that its gradient is safe at zero), the second
    # combined by XLA with v_row's; the scalar sum of u**2 of the update
    # clipping, which depends on v_row.
    "adafactor": ({"all-reduce": 3, "all-gather": 1}, [((),), ((), (32,)), ((),)]),
    # mu[1] = max over dim 0 (the (1, 32) accumulator); mu[0] is local
    "sm3": ({"all-reduce": 1, "all-gather": 1}, [((32,),)]),
    # the scalar sum of u**2
    "clip_by_block_rms": ({"all-reduce": 1, "all-gather": 1}, [((),)]),
    # unit norms reduce dim 0: the (1, 32) norms of g and of p, combined
    "adaptive_grad_clip": ({"all-reduce": 1, "all-gather": 1}, [((32,), (32,))]),
}


@eqx.filter_jit
def step(params, opt, grads):
    return opt.step(params, grads)


def assert_close(got, want, rtol=1e-6):
    got_leaves = jax.tree.leaves(eqx.filter(got, eqx.is_array))
    want_leaves = jax.tree.leaves(eqx.filter(want, eqx.is_array))
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
        np.testing.assert_allclose(
            np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=1e-7
        )


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_zero1_step_collectives_and_numbers(name):
    """One compiled stage-1 step: exactly the collectives worked out above."""
    plan = shardopt.zero(1, mesh8())
    params = plan.shard_params(make_params())
    grads = plan.shard_params(make_grads())
    opt = shardopt.Optimizer(TRANSFORMS[name](), params, plan=plan)
    text = sh.compiled_text(step, params, opt, grads)
    counts, reduced = COLLECTIVES[name]
    assert sh.count_collectives(text) == counts
    found = sh.collectives(text)
    assert [c.shapes for c in found if c.kind == "all-reduce"] == reduced
    assert [c.shapes for c in found if c.kind == "all-gather"] == [((64, 32),)]

    new_params, new_opt = step(params, opt, grads)
    plain = shardopt.Optimizer(TRANSFORMS[name](), make_params())
    want_params, want_opt = step(make_params(), plain, make_grads())
    assert_close(new_params, want_params)
    assert_close((new_opt.state, new_opt.count), (want_opt.state, want_opt.count))


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("spec", [P(None, "model"), P("model", None)])
@pytest.mark.parametrize("name", ["adafactor", "sm3", "adaptive_grad_clip"])
def test_tensor_parallel_layout_matches_unsharded(name, spec, stage):
    """w split over "model" on either dim, ZeRO over "data": the same numbers."""
    plan = shardopt.zero(stage, mesh4x2(), min_size=0)
    specs = {"w": spec, "b": P()}
    params = plan.shard_params(make_params(), specs)
    opt = shardopt.Optimizer(TRANSFORMS[name](), params, plan=plan)
    plain = shardopt.Optimizer(TRANSFORMS[name](), make_params())
    want = make_params()
    for i in range(2):
        params, opt = step(params, opt, plan.shard_params(make_grads(i), specs))
        want, plain = step(want, plain, make_grads(i))
    assert_close(params, want)
    assert_close((opt.state, opt.count), (plain.state, plain.count))
    # the model axis stays on w's statistics along the dims they keep
    model_dim = tuple(spec).index("model")
    for leaf in plan.state_layout(opt.state, params):
        if leaf.path.endswith("['w']") and leaf.shape[model_dim] > 1:
            assert "model" in str(leaf.spec[model_dim]), leaf


def test_factored_statistics_are_placed_on_the_dims_they_keep():
    plan = shardopt.zero(1, mesh8(), min_size=0)
    params = plan.shard_params(make_params())
    opt = shardopt.Optimizer(TRANSFORMS["adafactor"](), params, plan=plan)
    layout = {leaf.path: leaf for leaf in plan.state_layout(opt.state, params)}
    assert layout["[0].v_col['w']"].shape == (64, 1)
    assert layout["[0].v_col['w']"].spec == P("data", None)
    # the row statistic drops w's data dim: ZeRO moves the data axis to dim 1
    assert layout["[0].v_row['w']"].spec == P(None, "data")
    assert layout["[0].v['b']"].kind == "mirror"
    assert "['w']" not in str([p for p in layout if p.startswith("[0].v[")])
    sm3 = shardopt.Optimizer(TRANSFORMS["sm3"](), params, plan=plan)
    layout = {leaf.path: leaf for leaf in plan.state_layout(sm3.state, params)}
    assert layout["[0].mu[0]['w']"].spec == P("data", None)
    assert layout["[0].mu[1]['w']"].spec == P(None, "data")
    assert layout["[0].nu['w']"].spec == P("data", None)


@pytest.mark.parametrize("name", ["adafactor", "sm3"])
def test_nothing_large_is_replicated(name):
    """From shapes only: every state leaf of min_size elements is partitioned."""
    plan = shardopt.zero(1, mesh8())
    params = {
        "embed": jax.ShapeDtypeStruct((4096, 1024), jnp.float32),
        "cube": jax.ShapeDtypeStruct((8, 256, 512), jnp.bfloat16),
        "bias": jax.ShapeDtypeStruct((1024,), jnp.float32),
    }
    transform = {
        "adafactor": shardopt.adafactor(1e-2),
        "sm3": shardopt.sm3(1e-2),
    }[name]
    state = jax.eval_shape(transform.init, params)
    for leaf in plan.state_layout(state, params):
        assert leaf.kind != "other" or leaf.shape == (), leaf
        if np.prod(leaf.shape) >= plan.min_size:
            assert "data" in str(leaf.spec), leaf
    report = sh.memory_report(plan, params, transform)
    big = [r for r in report.not_partitioned() if r.role == "state"]
    assert all(np.prod(r.shape) < plan.min_size for r in big), big
    # one full copy of the parameters, per device: sm3's momentum is one
    full = 4 * (4096 * 1024 + 1024) + 2 * 8 * 256 * 512
    limit = {"adafactor": full / 8 / 100, "sm3": full / 8 * 1.01}[name]
    assert max(report.totals()["state"]) < limit


# ------------------------------------------------------ numbers, small cases
def test_adaptive_grad_clip_axis_matches_optax():
    params = {"w": jax.random.normal(jax.random.key(1), (6, 4, 5))}
    grads = {"w": 3 * jax.random.normal(jax.random.key(2), (6, 4, 5))}
    for axis in [-1, (0, 2)]:
        ours = shardopt.adaptive_grad_clip(0.7, axis=axis)
        got, _ = ours.update(grads, ours.init(params), params)
        oracle = optax.adaptive_grad_clip(0.7, axis=axis)
        want, _ = oracle.update(grads, oracle.init(params), params)
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
        assert not np.allclose(got["w"], grads["w"])  # some units were clipped


def test_the_rows_clip_some_blocks_and_units():
    """The table's thresholds really clip (and AGC leaves some units alone)."""
    params = make_params()
    grads = jax.tree.map(lambda p, g: 0.5 * p + g, params, make_grads())
    clip = shardopt.clip_by_block_rms(0.5)
    clipped, _ = clip.update(grads, clip.init(params))
    rms = jnp.sqrt(jnp.mean(clipped["w"] ** 2))
    np.testing.assert_allclose(rms, 0.5, rtol=1e-6)
    agc = shardopt.adaptive_grad_clip(1.0)
    clipped, _ = agc.update(grads, agc.init(params), params)
    changed = np.any(np.asarray(clipped["w"] != grads["w"]), axis=0)
    assert changed.any() and not changed.all()


def test_sm3_scalar_acts_as_a_one_element_vector():
    params = {"s": jnp.asarray(2.0), "v": jnp.asarray([2.0])}
    grads = {"s": jnp.asarray(0.5), "v": jnp.asarray([0.5])}
    tx = shardopt.scale_by_sm3()
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state)
        np.testing.assert_array_equal(updates["s"].reshape(1), updates["v"])


def test_adafactor_does_not_need_the_params_for_its_statistics():
    tx = shardopt.scale_by_factored_rms(min_dim_size_to_factor=2)
    params = make_params()
    state = tx.init(params)
    _, new = tx.update(make_grads(), state)
    assert new.v_row["w"].shape == (1, 32) and new.v_col["w"].shape == (64, 1)
    assert new.v["w"] is None and new.v_row["b"] is None
    assert jax.tree.structure(new) == jax.tree.structure(state)


def test_step_offset_is_a_leaf_that_shifts_the_decay():
    """Offset 2 at count 5 is offset 0 at count 3; a new offset does not recompile."""
    params, grads = make_params(), make_grads()
    shifted = shardopt.scale_by_factored_rms(step_offset=2, min_dim_size_to_factor=2)
    plain = shardopt.scale_by_factored_rms(min_dim_size_to_factor=2)
    assert shifted.step_offset.dtype == jnp.int32
    at = lambda tx, count: eqx.tree_at(lambda s: s.count, tx.init(params), count)
    traces = []

    @eqx.filter_jit
    def update(tx, state):
        traces.append(None)
        return tx.update(grads, state)[0]

    got = update(shifted, at(shifted, jnp.int32(5)))
    want = update(plain, at(plain, jnp.int32(3)))
    for key in params:
        np.testing.assert_array_equal(got[key], want[key])
    assert len(traces) == 1


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: shardopt.adafactor(decay_rate=-0.8), ValueError, "decay_rate must be"),
        (lambda: shardopt.adafactor(eps=-1.0), ValueError, "eps must be >= 0"),
        (
            lambda: shardopt.adafactor(clipping_threshold=0.0),
            ValueError,
            "clipping_threshold must be > 0",
        ),
        (
            lambda: shardopt.adafactor(momentum=1.0),
            ValueError,
            r"momentum must be in \[0, 1\)",
        ),
        (lambda: shardopt.adafactor(decay_offset=-1), ValueError, "decay_offset"),
        (lambda: shardopt.adafactor(decay_offset=1.5), ValueError, "decay_offset"),
        (
            lambda: shardopt.adafactor(min_dim_size_to_factor=-1),
            ValueError,
            "min_dim_size_to_factor must be >= 0",
        ),
        (
            lambda: shardopt.adafactor(min_dim_size_to_factor=2.5),
            TypeError,
            "min_dim_size_to_factor must be an int",
        ),
        (lambda: shardopt.adafactor(-1e-2), ValueError, "learning_rate must be"),
        (
            lambda: shardopt.scale_by_factored_rms(epsilon=float("nan")),
            ValueError,
            "epsilon must be finite",
        ),
        (
            lambda: shardopt.scale_by_factored_rms(decay_rate_fn=0.8),
            TypeError,
            "decay_rate_fn",
        ),
        (lambda: shardopt.sm3(-1e-2), ValueError, "learning_rate must be >= 0"),
        (
            lambda: shardopt.sm3(1e-2, momentum=1.5),
            ValueError,
            r"momentum must be in \[0, 1\)",
        ),
        (
            lambda: shardopt.scale_by_sm3(b2=1.5),
            ValueError,
            r"b2 must be in \[0, 1\]",
        ),
        (lambda: shardopt.scale_by_sm3(eps=-1.0), ValueError, "eps must be >= 0"),
        (
            lambda: shardopt.clip_by_block_rms(0.0),
            ValueError,
            "threshold must be > 0",
        ),
        (
            lambda: shardopt.adaptive_grad_clip(-1.0),
            ValueError,
            "clipping must be >= 0",
        ),
        (
            lambda: shardopt.adaptive_grad_clip(0.1, eps=-1.0),
            ValueError,
            "eps must be >= 0",
        ),
        (lambda: shardopt.adaptive_grad_clip(0.1, axis="0"), TypeError, "axis"),
    ],
)
def test_bad_arguments_name_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_adaptive_grad_clip_needs_params_and_a_known_rank():
    tx = shardopt.adaptive_grad_clip(0.1)
    params = {"x": jnp.ones((2,) * 6)}
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="pass axis="):
        tx.update(params, tx.init(params), params)
