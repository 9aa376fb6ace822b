"""L-BFGS and the line searches, beyond the table (which passes no value_fn):
step-by-step parity with optax in its documented loops, through Optimizer.step
with extra arguments, the same numbers under ZeRO, where the history is placed
today, and bad input."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import shardopt

# A tree with dims divisible by 8: w (8, 2), b (8,); 24 unknowns in all, started
# at Rosenbrock's classic (-1.2, 1) in every pair.
PARAMS = {
    "w": jnp.tile(jnp.array([-1.2, 1.0]), (8, 1)),
    "b": jnp.tile(jnp.array([-1.2, 1.0]), 4),
}
_M = jax.random.normal(jax.random.key(0), (24, 24)) / 5
HESSIAN = _M @ _M.T + jnp.eye(24)


def flat(p):
    return jnp.concatenate([p["w"].ravel(), p["b"]])


def quadratic(p):
    x = flat(p)
    return 0.5 * x @ (HESSIAN @ x) - jnp.sum(x)


def rosenbrock(p):
    """The extended Rosenbrock function (pairs), minimum 0 at all ones."""
    x = flat(p)
    a, b = x[0::2], x[1::2]
    return jnp.sum((1 - a) ** 2 + 100 * (b - a**2) ** 2)


OBJECTIVES = {"quadratic": quadratic, "rosenbrock": rosenbrock}


@functools.cache
def mesh8():
    return Mesh(np.array(jax.devices()), ("data",))


def optax_run(make, objective, steps, from_state=True, **data):
    """optax's documented loop: value and grad (from the state), update, apply."""
    tx = make(optax)
    vg = (
        optax.value_and_grad_from_state(objective)
        if from_state
        else lambda p, state: jax.value_and_grad(objective)(p, **data)
    )

    @jax.jit
    def step(params, state):
        with jax.numpy_dtype_promotion("standard"):  # optax is written for it
            value, grad = vg(params, state=state)
            updates, state = tx.update(
                grad, state, params, value=value, grad=grad, value_fn=objective, **data
            )
            return optax.apply_updates(params, updates), state

    params, state, out = PARAMS, tx.init(PARAMS), []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(params)
    return out


def ours_run(make, objective, steps, from_state=True, **data):
    """The same loop with shardopt's transform and value_and_grad_from_state."""
    tx = make(shardopt)
    vg = (
        shardopt.value_and_grad_from_state(objective)
        if from_state
        else lambda p, state: jax.value_and_grad(objective)(p, **data)
    )

    @jax.jit
    def step(params, state):
        value, grad = vg(params, state=state)
        updates, state = tx.update(
            grad, state, params, value=value, grad=grad, value_fn=objective, **data
        )
        return shardopt.apply_updates(params, updates), state

    params, state, out = PARAMS, tx.init(PARAMS), []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(params)
    return out


def optimizer_run(make, objective, steps, plan=None, from_state=True, **data):
    """Through shardopt.Optimizer.step(params, grads, value=, grad=, value_fn=)."""
    params = PARAMS if plan is None else plan.shard_params(PARAMS)
    opt = shardopt.Optimizer(make(shardopt), params, plan=plan)
    vg = (
        shardopt.value_and_grad_from_state(objective)
        if from_state
        else lambda p, state: jax.value_and_grad(objective)(p, **data)
    )

    @eqx.filter_jit
    def step(params, opt):
        value, grad = vg(params, state=opt)
        extra = dict(value=value, grad=grad, value_fn=objective, **data)
        return opt.step(params, grad, **extra)

    out = []
    for _ in range(steps):
        params, opt = step(params, opt)
        out.append(params)
    return out, opt


def worst(got, want):
    """The largest per-leaf relative difference ``max|g - w| / max|w|``."""
    return max(
        float(jnp.max(jnp.abs(g - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1e-30))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )


def assert_same_iterates(got, want, rtol=1e-5):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert worst(g, w) <= rtol, f"step {i}: relative difference {worst(g, w)}"


# --------------------------------------------------------------------- lbfgs
# make(lib) builds the same optimizer from optax or shardopt (same names).
LBFGS = {
    "default": (lambda m: m.lbfgs(), True),
    "memory_size=3": (lambda m: m.lbfgs(memory_size=3), True),
    "unscaled": (lambda m: m.lbfgs(scale_init_precond=False), True),
    "backtracking": (
        lambda m: m.lbfgs(
            linesearch=m.scale_by_backtracking_linesearch(20, store_grad=True)
        ),
        True,
    ),
    # no line search: a fixed step, plain value_and_grad
    "lr_no_linesearch": (lambda m: m.lbfgs(0.5, linesearch=None), False),
}
STEPS = {"quadratic": 12, "rosenbrock": 45}


@functools.cache
def optax_lbfgs(case, objective):
    make, from_state = LBFGS[case]
    return optax_run(make, OBJECTIVES[objective], STEPS[objective], from_state)


@functools.cache
def ours_lbfgs(case, objective):
    make, from_state = LBFGS[case]
    return ours_run(make, OBJECTIVES[objective], STEPS[objective], from_state)


@pytest.mark.parametrize(
    "case, objective",
    [
        ("default", "quadratic"),
        ("default", "rosenbrock"),
        ("memory_size=3", "rosenbrock"),
        ("unscaled", "rosenbrock"),
        ("backtracking", "rosenbrock"),
        ("lr_no_linesearch", "quadratic"),
    ],
)
def test_lbfgs_matches_optax_step_by_step(case, objective):
    assert_same_iterates(ours_lbfgs(case, objective), optax_lbfgs(case, objective))


def test_lbfgs_converges_on_rosenbrock_as_optax_does():
    ours = ours_lbfgs("default", "rosenbrock")
    theirs = optax_lbfgs("default", "rosenbrock")
    assert float(rosenbrock(theirs[-1])) < 1e-8
    assert float(rosenbrock(ours[-1])) < 1e-8
    np.testing.assert_allclose(flat(ours[-1]), np.ones(24), rtol=1e-4)


def test_lbfgs_through_optimizer_step():
    got, opt = optimizer_run(LBFGS["default"][0], rosenbrock, STEPS["rosenbrock"])
    assert_same_iterates(got, optax_lbfgs("default", "rosenbrock"))
    zoom = opt.state[2]
    assert isinstance(zoom, shardopt.ScaleByZoomLinesearchState)
    assert int(opt.state[0].count) == STEPS["rosenbrock"]


# -------------------------------------------------------- plain + line search
LINESEARCH = {
    "zoom": (lambda m: m.chain(m.sgd(1.0), m.scale_by_zoom_linesearch(15)), True),
    "zoom_options": (
        lambda m: m.chain(
            m.sgd(1.0),
            m.scale_by_zoom_linesearch(
                10,
                max_learning_rate=0.05,
                increase_factor=1.5,
                curv_rtol=math.inf,
                approx_dec_rtol=None,
                initial_guess_strategy="one",
            ),
        ),
        True,
    ),
    "backtracking": (
        lambda m: m.chain(m.sgd(1.0), m.scale_by_backtracking_linesearch(40)),
        False,
    ),
    "backtracking_stored": (
        lambda m: m.chain(
            m.sgd(1.0), m.scale_by_backtracking_linesearch(40, store_grad=True)
        ),
        True,
    ),
    "backtracking_options": (
        lambda m: m.chain(
            m.sgd(1.0),
            m.scale_by_backtracking_linesearch(
                30,
                slope_rtol=0.3,
                decrease_factor=0.5,
                increase_factor=math.inf,
                max_learning_rate=0.01,
                atol=1e-3,
                rtol=1e-4,
            ),
        ),
        False,
    ),
}


@pytest.mark.parametrize(
    "case, objective",
    [
        ("zoom", "quadratic"),
        ("zoom", "rosenbrock"),
        ("zoom_options", "rosenbrock"),
        ("backtracking", "quadratic"),
        ("backtracking_stored", "rosenbrock"),
        ("backtracking_options", "rosenbrock"),
    ],
)
def test_linesearch_with_sgd_matches_optax(case, objective):
    make, from_state = LINESEARCH[case]
    f = OBJECTIVES[objective]
    want = optax_run(make, f, 15, from_state)
    got = ours_run(make, f, 15, from_state)
    assert_same_iterates(got, want)
    assert float(f(got[-1])) < float(f(PARAMS))  # it descends


def least_squares(params, x, y):
    return 0.5 * jnp.sum((x @ flat(params) - y) ** 2)


def test_extra_keywords_reach_value_fn_through_optimizer_step():
    x = jax.random.normal(jax.random.key(1), (30, 24))
    y = jax.random.normal(jax.random.key(2), (30,))
    make, _ = LINESEARCH["zoom"]
    want = optax_run(make, least_squares, 8, from_state=False, x=x, y=y)
    got, _ = optimizer_run(make, least_squares, 8, from_state=False, x=x, y=y)
    assert_same_iterates(got, want)


# ---------------------------------------------------------------------- ZeRO
# Stage 0 reproduces the unsharded numbers bit for bit. Stage 3 partitions the
# parameters: float32 dot products over 8 shards add in another order, so the
# iterates differ from the first step by ~1e-7. On the quadratic that stays
# below 1e-5; along Rosenbrock's curved valley such differences grow for a
# while (a different, equally valid path) before both runs converge to the
# same minimum, so there only the first steps and the end are compared.
@pytest.mark.parametrize("stage", [0, 3])
def test_lbfgs_same_numbers_under_zero(stage):
    plan = shardopt.zero(stage, mesh8(), min_size=0)
    make = LBFGS["default"][0]
    quad, _ = optimizer_run(make, quadratic, STEPS["quadratic"], plan=plan)
    assert_same_iterates(quad, ours_lbfgs("default", "quadratic"))
    rosen, opt = optimizer_run(make, rosenbrock, STEPS["rosenbrock"], plan=plan)
    unsharded = ours_lbfgs("default", "rosenbrock")
    if stage == 0:
        assert_same_iterates(rosen, unsharded, rtol=0.0)
    else:
        assert_same_iterates(rosen[:6], unsharded[:6])
        assert float(rosenbrock(rosen[-1])) < 1e-8
        assert worst(rosen[-1], unsharded[-1]) <= 1e-4
    for leaf in (rosen[-1]["b"], opt.state[2].grad["b"], opt.state[0].params["w"]):
        if stage == 3:
            assert leaf.sharding.spec[0] == "data"
        else:
            assert leaf.sharding.is_fully_replicated


def test_lbfgs_under_zero_on_an_explicit_mesh():
    """Explicit mesh axes: the replicated history meets partitioned vectors only
    through explicit reshards, so stage 3 runs and gives the same numbers."""
    axis_types = (jax.sharding.AxisType.Explicit,)
    mesh = jax.make_mesh((8,), ("data",), axis_types=axis_types)
    plan = shardopt.zero(3, mesh, min_size=0)
    got, opt = optimizer_run(LBFGS["default"][0], quadratic, 6, plan=plan)
    assert_same_iterates(got, ours_lbfgs("default", "quadratic")[:6])
    assert opt.state[0].params["w"].sharding.spec[0] == "data"


@pytest.mark.parametrize("stage", [0, 3])
def test_backtracking_same_numbers_under_zero(stage):
    plan = shardopt.zero(stage, mesh8(), min_size=0)
    make, from_state = LINESEARCH["backtracking_stored"]
    got, _ = optimizer_run(make, quadratic, 10, plan=plan, from_state=from_state)
    want = ours_run(make, quadratic, 10, from_state)
    assert_same_iterates(got, want, rtol=0.0 if stage == 0 else 1e-5)


def test_lbfgs_history_is_partitioned_like_its_parameter():
    """``params``/``updates`` and the line search's ``grad`` mirror the parameters;
    the history (``memory_size`` rows shaped like each parameter, declared
    with a leading dim of its own) is partitioned on the parameter's dims."""
    plan = shardopt.zero(3, mesh8(), min_size=0)
    params = plan.shard_params(PARAMS)
    opt = shardopt.Optimizer(shardopt.lbfgs(memory_size=4), params, plan=plan)
    layout = {leaf.path: leaf for leaf in plan.state_layout(opt.state, params)}
    for name in ("[0].params['w']", "[0].updates['w']", "[2].grad['w']"):
        assert layout[name].kind == "mirror"
        assert layout[name].spec == P("data", None)
    history = layout["[0].diff_params_memory['w']"]
    assert (history.kind, history.spec) == ("factored", P(None, "data", None))
    history = layout["[0].diff_updates_memory['b']"]
    assert (history.kind, history.spec) == ("factored", P(None, "data"))
    assert opt.state[0].diff_params_memory["w"].shape == (4, 8, 2)
    assert not opt.state[0].diff_params_memory["w"].sharding.is_fully_replicated


# -------------------------------------------------------------- dtypes, init
def test_bfloat16_parameters_stay_bfloat16():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    f = lambda p: rosenbrock(jax.tree.map(lambda x: x.astype(jnp.float32), p))
    tx = shardopt.lbfgs()
    state = tx.init(params)
    vg = shardopt.value_and_grad_from_state(f)

    @jax.jit
    def step(params, state):
        value, grad = vg(params, state=state)
        updates, state = tx.update(
            grad, state, params, value=value, grad=grad, value_fn=f
        )
        return shardopt.apply_updates(params, updates), state, updates

    before = jax.tree.map(lambda x: x.dtype, state)
    for _ in range(3):
        params, state, updates = step(params, state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(updates))
    assert jax.tree.map(lambda x: x.dtype, state) == before
    assert state[2].value.dtype == jnp.float32
    assert float(f(params)) < float(f(PARAMS))


def test_init_on_shape_dtype_structs():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    opt = shardopt.Optimizer(shardopt.lbfgs(memory_size=5), abstract)
    assert opt.state[0].diff_updates_memory["w"].shape == (5, 8, 2)
    assert opt.state[0].weights_memory.shape == (5,)
    concrete = shardopt.lbfgs(memory_size=5).init(PARAMS)
    assert jax.tree.structure(opt.state) == jax.tree.structure(concrete)


def test_verbose_reports_a_failed_search(capfd):
    tx = shardopt.chain(
        shardopt.scale(1.0),  # an ascent direction: no decrease exists
        shardopt.scale_by_backtracking_linesearch(3, verbose=True),
    )
    state = tx.init(PARAMS)
    value, grad = jax.value_and_grad(quadratic)(PARAMS)
    _, state = jax.jit(
        lambda s: tx.update(grad, s, PARAMS, value=value, grad=grad, value_fn=quadratic)
    )(state)
    jax.effects_barrier()
    assert "no step size with sufficient decrease" in capfd.readouterr().out
    assert float(state[1].info.decrease_error) > 0


class Model(eqx.Module):
    w: jax.Array
    activation: object = jax.nn.tanh  # a leaf that is no array


def test_lbfgs_on_an_equinox_model_through_optimizer_step():
    model = Model(jnp.array([0.5, -1.0, 2.0]))
    loss = lambda m: jnp.sum((m.activation(m.w) - 0.25) ** 2)
    opt = shardopt.Optimizer(shardopt.lbfgs(), model)
    vg = shardopt.value_and_grad_from_state(loss)

    @eqx.filter_jit
    def step(model, opt):
        value, grad = vg(model, state=opt)
        return opt.step(model, grad, value=value, grad=grad, value_fn=loss)

    for _ in range(15):
        model, opt = step(model, opt)
    assert model.activation is jax.nn.tanh
    assert float(loss(model)) < 1e-8


# ----------------------------------------------------------------- bad input
LINE_SEARCHES = {
    "zoom": lambda: shardopt.scale_by_zoom_linesearch(5),
    "backtracking": lambda: shardopt.scale_by_backtracking_linesearch(5),
    "lbfgs": lambda: shardopt.lbfgs(),
}


@pytest.mark.parametrize("name", sorted(LINE_SEARCHES))
def test_missing_value_fn_is_named(name):
    tx = LINE_SEARCHES[name]()
    state = tx.init(PARAMS)
    value, grad = jax.value_and_grad(quadratic)(PARAMS)
    with pytest.raises(TypeError, match=r"needs value_fn="):
        tx.update(grad, state, PARAMS, value=value, grad=grad)
    with pytest.raises(TypeError, match=r"needs value=, grad=, value_fn="):
        tx.update(grad, state, PARAMS)
    opt = shardopt.Optimizer(tx, PARAMS)
    with pytest.raises(TypeError, match=r"value_fn="):
        opt.step(PARAMS, grad, value=value, grad=grad)
    with pytest.raises(TypeError, match=r"needs params="):
        tx.update(grad, state, None, value=value, grad=grad, value_fn=quadratic)


def test_unused_keywords_are_named():
    tx = shardopt.scale_by_zoom_linesearch(5)
    value, grad = jax.value_and_grad(quadratic)(PARAMS)
    with pytest.raises(TypeError, match=r"does not take: \['batch'\]"):
        tx.update(
            grad,
            tx.init(PARAMS),
            PARAMS,
            value=value,
            grad=grad,
            value_fn=quadratic,
            batch=1,
        )


@pytest.mark.parametrize("memory_size", [0, -3])
def test_memory_size_must_be_positive(memory_size):
    message = rf"memory_size must be >= 1, got {memory_size}"
    with pytest.raises(ValueError, match=message):
        shardopt.scale_by_lbfgs(memory_size)
    with pytest.raises(ValueError, match="memory_size"):
        shardopt.lbfgs(memory_size=memory_size)


def test_memory_size_must_be_an_integer():
    with pytest.raises(ValueError, match=r"memory_size must be an integer, got 2\.5"):
        shardopt.scale_by_lbfgs(2.5)


BACKTRACKING = shardopt.scale_by_backtracking_linesearch
ZOOM = shardopt.scale_by_zoom_linesearch
BAD_CONSTANTS = [
    ("max_backtracking_steps", lambda: BACKTRACKING(-1)),
    ("max_backtracking_steps", lambda: BACKTRACKING(1.5)),
    ("slope_rtol", lambda: BACKTRACKING(5, slope_rtol=-0.1)),
    ("decrease_factor", lambda: BACKTRACKING(5, decrease_factor=1.0)),
    ("decrease_factor", lambda: BACKTRACKING(5, decrease_factor=0.0)),
    ("increase_factor", lambda: BACKTRACKING(5, increase_factor=0.5)),
    ("max_learning_rate", lambda: BACKTRACKING(5, max_learning_rate=0.0)),
    ("atol", lambda: BACKTRACKING(5, atol=-1.0)),
    ("rtol", lambda: BACKTRACKING(5, rtol=math.nan)),
    ("max_linesearch_steps", lambda: ZOOM(0)),
    ("max_learning_rate", lambda: ZOOM(5, max_learning_rate=-1.0)),
    ("tol", lambda: ZOOM(5, tol=-1e-3)),
    ("increase_factor", lambda: ZOOM(5, increase_factor=1.0)),
    ("slope_rtol", lambda: ZOOM(5, slope_rtol=1.0)),
    ("curv_rtol", lambda: ZOOM(5, curv_rtol=0.0)),
    ("approx_dec_rtol", lambda: ZOOM(5, approx_dec_rtol=-1.0)),
    ("stepsize_precision", lambda: ZOOM(5, stepsize_precision=math.inf)),
    ("initial_guess_strategy", lambda: ZOOM(5, initial_guess_strategy="two")),
    ("linesearch", lambda: shardopt.lbfgs(linesearch="zoom")),
]


@pytest.mark.parametrize("name, make", BAD_CONSTANTS, ids=[n for n, _ in BAD_CONSTANTS])
def test_bad_constants_name_the_argument(name, make):
    with pytest.raises((ValueError, TypeError), match=rf"^{name}\b"):
        make()


def test_curvature_must_exceed_decrease_tolerance():
    with pytest.raises(ValueError, match="curv_rtol must be > slope_rtol"):
        shardopt.scale_by_zoom_linesearch(5, slope_rtol=0.5, curv_rtol=0.4)


def test_value_and_grad_from_state_needs_a_line_search_state():
    f = shardopt.value_and_grad_from_state(quadratic)
    with pytest.raises(ValueError, match="no value found in the state"):
        f(PARAMS, state=shardopt.sgd(0.1).init(PARAMS))
    no_grad = shardopt.scale_by_backtracking_linesearch(5)  # store_grad=False
    with pytest.raises(ValueError, match=r"no grad found in the state \(.*is None\)"):
        f(PARAMS, state=no_grad.init(PARAMS))
    two = shardopt.chain(
        shardopt.scale_by_zoom_linesearch(5), shardopt.scale_by_zoom_linesearch(5)
    )
    with pytest.raises(ValueError, match=r"several entries named 'value'"):
        f(PARAMS, state=two.init(PARAMS))
    with pytest.raises(TypeError, match="state="):
        f(PARAMS)
    with pytest.raises(TypeError, match="value_fn must be a function"):
        shardopt.value_and_grad_from_state(3.0)
