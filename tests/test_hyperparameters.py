"""Hyperparameters are array leaves or schedules: changing them never recompiles."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shardopt

PARAMS = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
GRADS = {"w": jnp.full((4, 3), 0.5), "b": jnp.ones((3,))}


def counting_step():
    traces = []

    @eqx.filter_jit
    def step(params, opt, grads):
        traces.append(None)
        return opt.step(params, grads)

    return step, traces


def test_changing_hyperparameters_does_not_recompile():
    step, traces = counting_step()
    opt = shardopt.Optimizer(shardopt.adamw(1e-3, weight_decay=0.1), PARAMS)
    params, opt = step(PARAMS, opt, GRADS)
    opt = opt.with_hyperparameters(learning_rate=0.5, weight_decay=0.0)
    opt = eqx.tree_at(lambda o: o.transform.transforms[0].b1, opt, jnp.float32(0.5))
    moved, opt = step(params, opt, GRADS)
    assert len(traces) == 1
    assert float(jnp.max(jnp.abs(moved["w"] - params["w"]))) > 0.1  # lr 0.5 applied


def test_new_learning_rate_keeps_the_moments():
    opt = shardopt.Optimizer(shardopt.adam(1e-3), PARAMS)
    _, opt = opt.step(PARAMS, GRADS)
    changed = opt.with_hyperparameters(learning_rate=shardopt.constant_schedule(1e-4))
    assert changed.hyperparameters()["learning_rate"](0) == pytest.approx(1e-4)
    assert changed.count == 1
    np.testing.assert_array_equal(changed.state[0].mu["w"], opt.state[0].mu["w"])


def test_every_float_hyperparameter_takes_a_schedule():
    as_float = shardopt.Optimizer(
        shardopt.adamw(1e-2, b1=0.8, weight_decay=0.1), PARAMS
    )
    as_schedules = shardopt.Optimizer(
        shardopt.adamw(
            shardopt.constant_schedule(1e-2),
            b1=shardopt.constant_schedule(0.8),
            b2=shardopt.constant_schedule(0.999),
            eps=shardopt.constant_schedule(1e-8),
            weight_decay=shardopt.constant_schedule(0.1),
        ),
        PARAMS,
    )
    for _ in range(3):
        p1, as_float = as_float.step(PARAMS, GRADS)
        p2, as_schedules = as_schedules.step(PARAMS, GRADS)
        assert jax.tree.map(lambda a, b: bool(jnp.all(a == b)), p1, p2) == {
            "w": True,
            "b": True,
        }


def test_hyperparameters_lists_names_and_values():
    names = shardopt.Optimizer(shardopt.adamw(1e-3), PARAMS).hyperparameters()
    assert sorted(names) == [
        "b1",
        "b2",
        "eps",
        "eps_root",
        "learning_rate",
        "weight_decay",
    ]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: shardopt.adam(-1e-3), "learning_rate must be >= 0"),
        (lambda: shardopt.sgd(float("inf")), "learning_rate must be finite"),
        (lambda: shardopt.adam(1e-3, b1=float("nan")), "b1 must be finite"),
        (lambda: shardopt.adam(jnp.ones(2)), "learning_rate must be a real scalar"),
        (lambda: shardopt.clip_by_global_norm(-1.0), "max_norm must be >= 0"),
        (lambda: shardopt.adam("fast"), "learning_rate must be a real scalar"),
    ],
)
def test_bad_hyperparameters_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unknown_hyperparameter_lists_the_known_ones():
    opt = shardopt.Optimizer(shardopt.sgd(1e-3), PARAMS)
    with pytest.raises(
        ValueError, match=r"no hyperparameter named 'lr'.*learning_rate"
    ):
        opt.with_hyperparameters(lr=1e-2)


def test_schedule_that_returns_a_vector_is_rejected():
    opt = shardopt.Optimizer(shardopt.sgd(lambda count: jnp.ones(3) * 1e-3), PARAMS)
    with pytest.raises(ValueError, match=r"learning_rate returned shape \(3,\)"):
        opt.step(PARAMS, GRADS)
