"""optax.contrib's adaptive optimizers beyond the conformance table: bad input
named, hyperparameters changed by name, transforms that need the parameters."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import shardopt

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
GRADS = {"w": jnp.full((2, 3), 0.5), "b": jnp.ones(3)}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: shardopt.dog(init_step=("guess", 1e-6)), "init_step's type must be"),
        (lambda: shardopt.dog(init_step=("distance", -1.0)), "init_step_value"),
        (lambda: shardopt.dadapt_adamw(betas=(1.0, 0.999)), r"betas\[0\] must be"),
        (lambda: shardopt.prodigy(betas=(0.9, -0.1)), r"betas\[1\] must be"),
        (lambda: shardopt.prodigy(beta3=1.5), "beta3 must be in"),
        (lambda: shardopt.ademamix(1e-3, b3=1.0), "b3 must be in"),
        (lambda: shardopt.cocob(alpha=0.0), "alpha must be > 0"),
        (lambda: shardopt.madgrad(-1e-3), "learning_rate must be >= 0"),
        (lambda: shardopt.momo(beta=float("nan")), "beta must be finite"),
        (lambda: shardopt.adopt(1e-3, eps=-1.0), "eps must be >= 0"),
    ],
)
def test_bad_hyperparameters_name_the_argument(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "make",
    [
        shardopt.cocob,
        shardopt.dadapt_adamw,
        shardopt.prodigy,
        shardopt.dog,
        shardopt.dowg,
        lambda: shardopt.madgrad(1e-2),
    ],
)
def test_transforms_that_need_the_parameters_say_so(make):
    transform = make()
    state = transform.init(PARAMS)
    with pytest.raises(ValueError, match=r"needs the parameters"):
        transform.update(GRADS, state)


def test_hyperparameters_change_by_name_and_keep_the_state():
    opt = shardopt.Optimizer(shardopt.prodigy(), PARAMS)
    assert {"learning_rate", "b1", "b2", "b3", "estim_lr0"} <= set(
        opt.hyperparameters()
    )
    _, opt = opt.step(PARAMS, GRADS)
    changed = opt.with_hyperparameters(learning_rate=0.5, b3=0.75)
    assert float(changed.hyperparameters()["learning_rate"]) == 0.5
    assert float(changed.hyperparameters()["b3"]) == 0.75
    assert float(changed.state.estim_lr) == float(opt.state.estim_lr)


def test_adopt_clip_value_fn_is_used():
    # a bound of 0 clips every normalised gradient to 0: no step at all
    transform = shardopt.adopt(1.0, clip_value_fn=lambda count: jnp.zeros([]))
    opt = shardopt.Optimizer(transform, PARAMS)
    params = PARAMS
    for _ in range(3):
        params, opt = opt.step(params, GRADS)
    for name in PARAMS:
        assert jnp.array_equal(params[name], PARAMS[name])


def test_normalize_gives_unit_global_norm():
    updates, _ = shardopt.normalize().update(GRADS, shardopt.NormalizeState())
    total = sum(float(jnp.sum(u**2)) for u in updates.values())
    assert abs(total - 1.0) < 1e-6
