"""Stateful wrappers: what the conformance table's finite steps cannot show.

Skipped steps (a NaN gradient, a False condition) leave the inner state bit
for bit as it was, unsharded and under ZeRO stage 1 on 8 devices; monitored
measurements equal optax's; lookahead's fast and slow weights follow optax's;
the MultiSteps predicates and periodic_update agree with optax; bad
arguments are refused, naming them.
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
    EXACT_B1,
    EXACT_B2,
    gradient,
    make_params,
    make_shardable_params,
    relative_difference,
)
from jax.sharding import Mesh
from rows_wrappers import norm, not_every_third

import shardopt

step_jit = eqx.filter_jit(lambda p, o, g, kw: o.step(p, g, **kw))


def step(params, opt, grads, **extra_args):
    return step_jit(params, opt, grads, extra_args)


def leaves_bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def assert_bitwise(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert leaves_bytes(got) == leaves_bytes(want)


def with_nan(grads, leaf="matrix"):
    bad = dict(grads)
    bad[leaf] = bad[leaf].at[(0,) * bad[leaf].ndim].set(jnp.nan)
    return bad


def finite(tree):
    """Every leaf as float64 with NaNs as 0 (bfloat16 included), to compare."""
    return jax.tree.map(lambda x: np.nan_to_num(np.asarray(x, np.float64)), tree)


def assert_close(got, want, rtol=1e-6):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=0
        )


def optax_run(tx, params, grads_seq, extra=None):
    """optax's loop under standard promotion: the list of (params, state)."""
    out = []
    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(params)
        for i, grads in enumerate(grads_seq):
            kwargs = {} if extra is None else extra[i]
            updates, state = tx.update(grads, state, params, **kwargs)
            params = optax.apply_updates(params, updates)
            out.append((params, state))
    return out


@functools.cache
def mesh8():
    return Mesh(np.array(jax.devices()), ("data",))


# ------------------------------------------------------------ apply_if_finite
def adam_pair():
    return (
        shardopt.adam(1e-2, EXACT_B1, EXACT_B2),
        optax.adam(1e-2, EXACT_B1, EXACT_B2),
    )


def finite_steps(plan=None, make=make_params):
    """Two finite steps, then three NaN steps with max_consecutive_errors=2."""
    params = make()
    if plan is not None:
        params = plan.shard_params(params)
    opt = shardopt.Optimizer(
        shardopt.apply_if_finite(adam_pair()[0], 2), params, plan=plan
    )
    history = [(params, opt)]
    for i in range(5):
        grads = gradient(params, i)
        params, opt = step(params, opt, grads if i < 2 else with_nan(grads))
        history.append((params, opt))
    return history


@pytest.mark.parametrize("sharded", [False, True], ids=["unsharded", "zero1"])
def test_apply_if_finite_skips_nan_steps_and_keeps_inner_state(sharded):
    plan = shardopt.zero(1, mesh8(), min_size=0) if sharded else None
    history = finite_steps(plan, make_shardable_params)
    (p2, o2), (p3, o3), (p4, o4), (p5, o5) = history[2:]
    for params, opt in ((p3, o3), (p4, o4)):  # skipped: nothing moved
        assert_bitwise(params, p2)
        assert_bitwise(opt.state.inner_state, o2.state.inner_state)
        assert not bool(opt.state.last_finite)
    assert [int(o.state.notfinite_count) for o in (o2, o3, o4, o5)] == [0, 1, 2, 3]
    assert int(o5.state.total_notfinite) == 3
    # the third NaN step in a row is past the limit: applied, NaN and all
    assert np.isnan(np.asarray(p5["matrix"])).any()
    assert int(o5.state.inner_state[0].count) == 3
    if sharded:
        layout = plan.state_layout(o4.state, p4)
        assert any("data" in str(leaf.spec) for leaf in layout), layout
        want = finite_steps(None, make_shardable_params)
        for (p, o), (wp, wo) in zip(history, want, strict=True):
            assert_close(finite(p), finite(wp), rtol=2**-8)
            assert_close(finite(o.state), finite(wo.state), rtol=2**-8)


def test_apply_if_finite_counters_follow_optax():
    params = make_params()
    grads = [gradient(params, i) for i in range(6)]
    grads = [g if i in (0, 3) else with_nan(g, "vector") for i, g in enumerate(grads)]
    grads[4] = dict(grads[4], scalar=jnp.float32(jnp.inf))  # inf counts too
    want = optax_run(optax.apply_if_finite(adam_pair()[1], 1), params, grads)
    opt = shardopt.Optimizer(shardopt.apply_if_finite(adam_pair()[0], 1), params)
    for g, (want_params, want_state) in zip(grads, want, strict=True):
        params, opt = step(params, opt, g)
        for name in ("notfinite_count", "last_finite", "total_notfinite"):
            assert getattr(opt.state, name) == getattr(want_state, name), name
        assert_close(finite(params), finite(want_params), rtol=2**-8)


# ------------------------------------------------------- conditional wrappers
@pytest.mark.parametrize(
    "wrap", [shardopt.conditionally_mask, shardopt.conditionally_transform]
)
def test_skipped_condition_keeps_inner_state_bitwise(wrap):
    params = make_params()
    opt = shardopt.Optimizer(wrap(adam_pair()[0], not_every_third), params)
    grads = gradient(params, 0)
    new_params, opt1 = step(params, opt, grads)  # step 0 is skipped
    assert_bitwise(opt1.state.inner_state, opt.state.inner_state)
    if wrap is shardopt.conditionally_mask:
        assert_bitwise(new_params, params)
    else:  # the gradient passed through, added as it was
        assert_bitwise(new_params, shardopt.apply_updates(params, grads))
    _, opt2 = step(new_params, opt1, gradient(new_params, 1))  # step 1 runs
    assert int(opt2.state.inner_state[0].count) == 1


def test_forward_extra_args_reach_the_condition():
    def small_loss(step, value):
        return value < 1.0

    values = [0.5, 2.0, 0.5, 3.0]
    params = make_params()
    grads = [gradient(params, i) for i in range(len(values))]
    extra = [{"value": jnp.float32(v)} for v in values]
    want = optax_run(
        optax.conditionally_mask(adam_pair()[1], small_loss, forward_extra_args=True),
        params,
        grads,
        extra,
    )
    opt = shardopt.Optimizer(
        shardopt.conditionally_mask(
            adam_pair()[0], small_loss, forward_extra_args=True
        ),
        params,
    )
    for g, kw, (want_params, _) in zip(grads, extra, want, strict=True):
        params, opt = step(params, opt, g, **kw)
        assert_close(params, want_params, rtol=2**-8)
    assert int(opt.state.inner_state[0].count) == 2
    # without forwarding, the condition gets the step alone
    opt = shardopt.Optimizer(
        shardopt.conditionally_mask(adam_pair()[0], small_loss), make_params()
    )
    with pytest.raises(TypeError, match="value"):
        step(make_params(), opt, grads[0], value=jnp.float32(0.5))


def test_condition_must_return_a_scalar():
    opt = shardopt.Optimizer(
        shardopt.conditionally_mask(shardopt.sgd(0.1), lambda s: jnp.ones(2) > 0),
        make_params(),
    )
    with pytest.raises(ValueError, match="should_transform_fn must return a scalar"):
        step(make_params(), opt, gradient(make_params(), 0))


def test_conditionally_transform_needs_updates_shaped_like_its_input():
    pair = shardopt.LookaheadParams.init_synced(make_params())
    tx = shardopt.conditionally_transform(
        shardopt.lookahead(shardopt.sgd(0.1), 2, 0.5), not_every_third
    )
    with pytest.raises(ValueError, match="shaped like its input"):
        tx.update(pair.fast, tx.init(pair), pair)


# ------------------------------------------------------------------ zero_nans
def test_zero_nans_zeroes_nans_only_and_flags_them():
    params = make_params()
    grads = with_nan(gradient(params, 0), "cube")
    grads["half"] = grads["half"].at[0, 0].set(jnp.nan)
    grads["vector"] = grads["vector"].at[1].set(jnp.inf)
    ours, state = shardopt.zero_nans().update(grads, shardopt.zero_nans().init(params))
    with jax.numpy_dtype_promotion("standard"):
        want, want_state = optax.zero_nans().update(
            grads, optax.zero_nans().init(params)
        )
    assert_bitwise(ours, want)
    assert_bitwise(state.found_nan, want_state.found_nan)
    assert state.found_nan == {
        "cube": True,
        "half": True,
        "matrix": False,
        "scalar": False,
        "vector": False,
    }
    assert np.isinf(np.asarray(ours["vector"][1]))


# ------------------------------------------- snapshot, monitor, measure_with_ema
def test_measurements_equal_optax():
    def monitored(lib):
        return lib.chain(
            lib.trace(0.5),
            lib.snapshot("snap", norm),
            lib.monitor(
                {
                    "norm": norm,
                    "norm_ema": lib.measure_with_ema(norm, EXACT_B1),
                    "big_ema": lib.measure_with_ema(lambda u: norm(u) > 17.0, 0.5),
                }
            ),
            lib.scale(-3e-2),
        )

    # float32 only: optax's eager loop rounds a bfloat16 trace after every op,
    # a jitted step once per fusion, so bfloat16 measurements differ by an ulp
    params = jax.tree.map(lambda p: p.astype(jnp.float32), make_params())
    grads = [gradient(params, i) for i in range(5)]
    want = optax_run(monitored(optax), params, grads)
    opt = shardopt.Optimizer(monitored(shardopt), params)
    initial = opt
    for g, (_, want_state) in zip(grads, want, strict=True):
        params, opt = step(params, opt, g)
        for name in ("snap", "norm", "norm_ema", "big_ema"):
            got = optax.tree.get(opt.state, name)
            np.testing.assert_allclose(
                got, optax.tree.get(want_state, name), rtol=1e-6, err_msg=name
            )
            assert got.dtype == jnp.float32, name
    assert jax.tree.structure(opt) == jax.tree.structure(initial)
    big = np.asarray(optax.tree.get(opt.state, "big_ema"))
    assert 0 < big < 1  # steps 0-1 were below 17, 2-4 above


def test_snapshot_measurement_must_keep_its_shape():
    tx = shardopt.snapshot("first", lambda u: jax.tree.leaves(u)[0])
    with pytest.raises(ValueError, match="'first' changed shape"):
        tx.update({"a": jnp.ones(3)}, tx.init({"a": jnp.ones(())}))


def test_monitor_hyperparameters_are_found_and_replaced():
    tx = shardopt.chain(
        shardopt.monitor({"ema": shardopt.measure_with_ema(norm, 0.5)}),
        shardopt.sgd(0.1),
    )
    opt = shardopt.Optimizer(tx, make_params())
    assert float(opt.hyperparameters()["decay"]) == 0.5
    opt = opt.with_hyperparameters(decay=0.25)
    assert float(opt.hyperparameters()["decay"]) == 0.25


# ------------------------------------------------------------------ lookahead
def lookahead_pair(reset_state):
    ours, theirs = adam_pair()
    return (
        shardopt.lookahead(ours, 3, 0.5, reset_state=reset_state),
        optax.lookahead(theirs, 3, 0.5, reset_state=reset_state),
    )


def fast_grads(pair, i):
    return gradient(pair.fast, i)


@pytest.mark.parametrize("reset_state", [False, True])
def test_lookahead_fast_and_slow_follow_optax(reset_state):
    ours_tx, optax_tx = lookahead_pair(reset_state)
    start = make_params()
    theirs = optax.LookaheadParams.init_synced(start)
    want = []
    with jax.numpy_dtype_promotion("standard"):
        state = optax_tx.init(theirs)
        for i in range(6):  # two periods: the last step synchronises
            updates, state = optax_tx.update(fast_grads(theirs, i), state, theirs)
            theirs = optax.apply_updates(theirs, updates)
            want.append((theirs, state))
    params = shardopt.LookaheadParams.init_synced(start)
    opt = shardopt.Optimizer(ours_tx, params)
    for i, (want_params, want_state) in enumerate(want):
        # Optimizer.step takes grads shaped like the pair; the slow half is ignored
        g = fast_grads(params, i)
        grads = shardopt.LookaheadParams(g, jax.tree.map(jnp.zeros_like, g))
        params, opt = step(params, opt, grads)
        assert_close(params.fast, want_params.fast, rtol=2**-8)
        assert_close(params.slow, want_params.slow, rtol=2**-8)
        assert int(opt.state.steps_since_sync) == int(want_state.steps_since_sync)
        assert int(opt.state.fast_state[0].count) == int(want_state.fast_state[0].count)
    # after a sync the fast weights restart from the slow ones, up to rounding:
    # fast + (u - (1 - a) d) and slow + a d round apart (a bfloat16 ulp or two)
    assert int(opt.state.steps_since_sync) == 0
    differences = relative_difference(params.fast, params.slow)
    for leaf, difference in differences.items():
        bound = 2**-7 if params.slow[leaf].dtype == jnp.bfloat16 else 1e-6
        assert difference <= bound, (leaf, differences)


def test_lookahead_with_optax_pair_and_raw_update():
    ours_tx, optax_tx = lookahead_pair(False)
    pair = optax.LookaheadParams.init_synced(make_params())
    state = ours_tx.init(pair)
    with jax.numpy_dtype_promotion("standard"):
        want_state = optax_tx.init(pair)
        want, _ = optax_tx.update(fast_grads(pair, 0), want_state, pair)
    got, state = jax.jit(ours_tx.update)(fast_grads(pair, 0), state, pair)
    assert isinstance(got, optax.LookaheadParams)
    assert_close(got, want, rtol=2**-8)


def test_lookahead_under_zero_matches_unsharded_and_donates():
    plan = shardopt.zero(1, mesh8(), min_size=0)

    def run(plan):
        params = shardopt.LookaheadParams.init_synced(make_shardable_params())
        if plan is not None:
            params = plan.shard_params(params)
        opt = shardopt.Optimizer(lookahead_pair(True)[0], params, plan=plan)
        donated = eqx.filter_jit(donate="all")(lambda p, o, g: o.step(p, g))
        for i in range(4):
            g = fast_grads(params, i)
            zeros = jax.tree.map(jnp.zeros_like, g)  # buffers of its own: donated
            params, opt = donated(params, opt, shardopt.LookaheadParams(g, zeros))
        return params, opt

    got, want = run(plan), run(None)
    assert_close(got[0], want[0], rtol=2**-8)
    assert_close(got[1].state, want[1].state, rtol=2**-8)
    # the fast optimizer's moments mirror the ``fast`` half: partitioned
    layout = {leaf.path: leaf for leaf in plan.state_layout(got[1].state, got[0])}
    moment = layout[".fast_state[0].mu['matrix']"]
    assert (moment.kind, moment.spec[0]) == ("mirror", "data")


def test_lookahead_slow_step_size_is_a_hyperparameter():
    opt = shardopt.Optimizer(
        lookahead_pair(False)[0], shardopt.LookaheadParams.init_synced(make_params())
    )
    opt = opt.with_hyperparameters(slow_step_size=0.25)
    assert float(opt.hyperparameters()["slow_step_size"]) == 0.25


def test_lookahead_needs_a_pair():
    tx = lookahead_pair(False)[0]
    params = make_params()
    state = tx.init(params)  # as in optax: init accepts the fast weights alone
    with pytest.raises(ValueError, match="LookaheadParams pair"):
        tx.update(gradient(params, 0), state, params)


# --------------------------------------------- MultiSteps predicates, periodic
def test_skip_predicates_equal_optax():
    params = make_params()
    cases = [gradient(params, 0), with_nan(gradient(params, 1)), {}]
    cases[1]["vector"] = cases[1]["vector"].at[:2].set(jnp.inf)
    for grads in cases:
        got = shardopt.skip_not_finite(grads, 0, None)
        with jax.numpy_dtype_promotion("standard"):
            want = optax.skip_not_finite(grads, 0, None)
        assert bool(got[0]) == bool(want[0])
        assert int(got[1]["num_not_finite"]) == int(want[1]["num_not_finite"])
        for bound in (10.0, 500.0, jnp.float32(500.0)):
            got = shardopt.skip_large_updates(grads, 0, None, bound)
            with jax.numpy_dtype_promotion("standard"):
                want = optax.skip_large_updates(grads, 0, None, bound)
            assert bool(got[0]) == bool(want[0]), bound
            np.testing.assert_allclose(
                got[1]["norm_squared"], want[1]["norm_squared"], rtol=1e-6
            )


def test_skip_large_updates_drives_optax_multisteps():
    skip = functools.partial(shardopt.skip_large_updates, max_squared_norm=180.0)
    want_skip = functools.partial(optax.skip_large_updates, max_squared_norm=180.0)
    params = make_params()
    grads = [gradient(params, i) for i in range(6)]

    def multi(fn):
        return optax.MultiSteps(
            optax.sgd(1e-2), every_k_schedule=2, should_skip_update_fn=fn
        )

    got = optax_run(multi(skip), params, grads)
    want = optax_run(multi(want_skip), params, grads)
    skipped = [bool(s.skip_state["should_skip"]) for _, s in got]
    assert any(skipped) and not all(skipped), skipped
    for (gp, gs), (wp, ws) in zip(got, want, strict=True):
        assert_bitwise(gp, wp)
        assert bool(gs.skip_state["should_skip"]) == bool(ws.skip_state["should_skip"])


def test_periodic_update_equals_optax():
    new, old = make_params(0), make_params(1)
    for steps in (0, 1, 4, 6):
        got = jax.jit(shardopt.periodic_update, static_argnums=3)(new, old, steps, 3)
        want = optax.periodic_update(new, old, jnp.int32(steps), 3)
        assert_bitwise(got, want)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: shardopt.apply_if_finite("adam", 2), TypeError, "inner transform"),
        (
            lambda: shardopt.apply_if_finite(shardopt.sgd(0.1), -1),
            ValueError,
            "max_consecutive_errors must be >= 0, got -1",
        ),
        (
            lambda: shardopt.apply_if_finite(shardopt.sgd(0.1), 1.5),
            TypeError,
            "max_consecutive_errors must be an int",
        ),
        (
            lambda: shardopt.conditionally_mask(shardopt.sgd(0.1), 3),
            TypeError,
            "should_transform_fn must be callable",
        ),
        (
            lambda: shardopt.conditionally_transform(None, not_every_third),
            TypeError,
            "conditionally_transform's inner transform",
        ),
        (
            lambda: shardopt.conditionally_mask(shardopt.sgd(0.1), not_every_third, 1),
            TypeError,
            "forward_extra_args must be a bool",
        ),
        (lambda: shardopt.apply_every(0), ValueError, "k must be >= 1, got 0"),
        (lambda: shardopt.apply_every(True), TypeError, "k must be an int"),
        (lambda: shardopt.ema(1.0), ValueError, r"decay must be in \[0, 1\), got 1.0"),
        (lambda: shardopt.ema(0.9, debias="yes"), TypeError, "debias must be a bool"),
        (
            lambda: shardopt.measure_with_ema(None, 0.9),
            TypeError,
            "measure must be callable",
        ),
        (lambda: shardopt.snapshot(3, norm), TypeError, "measure_name must be a str"),
        (lambda: shardopt.monitor([norm]), TypeError, "measures must be a dict"),
        (lambda: shardopt.monitor({"a": 3}), TypeError, "measure 'a' must be"),
        (lambda: shardopt.monitor({1: norm}), TypeError, "names must be str"),
        (
            lambda: shardopt.lookahead(shardopt.sgd(0.1), 0, 0.5),
            ValueError,
            "sync_period must be >= 1, got 0",
        ),
        (
            lambda: shardopt.lookahead(shardopt.sgd(0.1), 2, 1.5),
            ValueError,
            r"slow_step_size must be in \[0, 1\], got 1.5",
        ),
        (
            lambda: shardopt.lookahead(shardopt.sgd(0.1), 2, 0.5, reset_state=1),
            TypeError,
            "reset_state must be a bool",
        ),
    ],
)
def test_bad_arguments_are_refused_by_name(build, error, match):
    with pytest.raises(error, match=match):
        build()
