"""Runs of optimizers that take the loss (``value=``): polyak_sgd, momo,
momo_adam. The conformance table's step passes no loss, so these are compared
with optax here, on a quadratic, through a jitted ``Optimizer.step``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import shardopt

STEPS = 8


def targets(params):
    """A float32 target per leaf, from a fixed key."""
    keys = jax.random.split(jax.random.key(7), len(params))
    return {
        name: jax.random.normal(key, params[name].shape, jnp.float32)
        for name, key in zip(sorted(params), keys, strict=True)
    }


def loss(params, targets):
    """A quadratic whose minimum value is 0.1, so the optimality gap these
    optimizers divide by stays informative."""
    total = jnp.float32(0.1)
    for name in sorted(params):
        d = params[name].astype(jnp.float32) - targets[name]
        total = total + 0.5 * jnp.sum(d * d)
    return total


def run_ours(transform, params, plan=None, steps: int = STEPS):
    """``steps`` jitted ``Optimizer.step(..., value=loss)``: (params, optimizer)."""
    goal = targets(params)
    opt = shardopt.Optimizer(transform, params, plan=plan)

    @jax.jit
    def step(params, opt):
        value, grads = jax.value_and_grad(loss)(params, goal)
        return opt.step(params, grads, value=value)

    for _ in range(steps):
        params, opt = step(params, opt)
    return params, opt


def run_optax(transform, params, steps: int = STEPS):
    """The same steps with an optax transform: the final params."""
    goal = targets(params)
    with jax.numpy_dtype_promotion("standard"):
        state = transform.init(params)

        @jax.jit
        def step(params, state):
            value, grads = jax.value_and_grad(loss)(params, goal)
            updates, state = transform.update(grads, state, params, value=value)
            return optax.apply_updates(params, updates), state

        for _ in range(steps):
            params, state = step(params, state)
    return params
