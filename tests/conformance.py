"""The one conformance table: every optimizer under test beside its optax oracle.

Shared by tests/test_conformance.py (parity with optax, no recompilation, stable
dtypes, the same numbers under ZeRO stages 0-3, a checkpoint round trip), the
idiom tests and scripts/parity.py. Every row builds the same optimizer twice:
once from shardopt, once from optax, with the same arguments. A row's ``ours``
may hold optax transforms too (the two libraries mix). What a row supports is
declared here, nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pathlib
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import shardopt

STEPS = 50
BF16_RTOL = 2**-8  # one bfloat16 ulp of the leaf's largest value


def weight_mask(params):
    """Decay matrices and cubes, not scalars or vectors (a typical AdamW mask)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


# optax folds ``1 - b2`` in float64 at trace time; shardopt keeps b2 as a float32
# leaf (so that changing it never recompiles) and computes ``1 - b2`` in float32:
# for b2 = 0.999 the two complements differ by 1.3e-5 relative, which moves
# float32 parameters by up to ~3e-6 relative over 50 steps. With betas that
# float32 represents exactly (the *_exact_betas rows) the gap is below 1e-6.
DECIMAL_BETAS_RTOL = 5e-6
EXACT_B1, EXACT_B2 = 0.875, 1 - 2**-10


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    ours: Callable[[], shardopt.AbstractTransform]
    oracle: Callable[[], optax.GradientTransformation]
    rtol: float = 1e-6  # float32 leaves; bfloat16 leaves are held to BF16_RTOL
    note: str = ""  # why rtol is looser than 1e-6, where it is


def _schedule_pair(lib):
    return lib.warmup_cosine_decay_schedule(0.0, 3e-2, 10, 50, end_value=1e-3)


ROWS = [
    Row("sgd", lambda: shardopt.sgd(3e-2), lambda: optax.sgd(3e-2)),
    Row(
        "sgd_momentum",
        lambda: shardopt.sgd(3e-2, momentum=0.9),
        lambda: optax.sgd(3e-2, momentum=0.9),
    ),
    Row(
        "sgd_nesterov",
        lambda: shardopt.sgd(3e-2, momentum=0.9, nesterov=True),
        lambda: optax.sgd(3e-2, momentum=0.9, nesterov=True),
    ),
    Row(
        "adam",
        lambda: shardopt.adam(1e-2),
        lambda: optax.adam(1e-2),
        DECIMAL_BETAS_RTOL,
    ),
    Row(
        "adam_exact_betas",
        lambda: shardopt.adam(1e-2, EXACT_B1, EXACT_B2),
        lambda: optax.adam(1e-2, EXACT_B1, EXACT_B2),
    ),
    Row(
        "nadam_mu_f32_exact_betas",
        lambda: shardopt.adam(
            1e-2, EXACT_B1, EXACT_B2, nesterov=True, mu_dtype=jnp.float32
        ),
        lambda: optax.adam(
            1e-2, EXACT_B1, EXACT_B2, nesterov=True, mu_dtype=jnp.float32
        ),
    ),
    Row(
        "adamw_masked",
        lambda: shardopt.adamw(1e-2, weight_decay=0.1, mask=weight_mask),
        lambda: optax.adamw(1e-2, weight_decay=0.1, mask=weight_mask),
        DECIMAL_BETAS_RTOL,
    ),
    Row(
        "adamw_masked_exact_betas",
        lambda: shardopt.adamw(
            1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
        lambda: optax.adamw(
            1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1, mask=weight_mask
        ),
    ),
    Row(
        "adamw_schedule",
        lambda: shardopt.adamw(_schedule_pair(shardopt), weight_decay=0.05),
        lambda: optax.adamw(_schedule_pair(optax), weight_decay=0.05),
        DECIMAL_BETAS_RTOL,
    ),
    Row("rmsprop", lambda: shardopt.rmsprop(1e-2), lambda: optax.rmsprop(1e-2)),
    Row(
        "rmsprop_centered_momentum",
        lambda: shardopt.rmsprop(1e-2, centered=True, momentum=0.9, initial_scale=1.0),
        lambda: optax.rmsprop(1e-2, centered=True, momentum=0.9, initial_scale=1.0),
    ),
    Row(
        "rmsprop_bias_correction",
        lambda: shardopt.rmsprop(1e-2, eps_in_sqrt=False, bias_correction=True),
        lambda: optax.rmsprop(1e-2, eps_in_sqrt=False, bias_correction=True),
    ),
    Row("adagrad", lambda: shardopt.adagrad(1e-1), lambda: optax.adagrad(1e-1)),
    Row("lion", lambda: shardopt.lion(1e-3), lambda: optax.lion(1e-3)),
    Row(
        "clip_by_global_norm_adam_exact_betas",
        lambda: shardopt.chain(
            shardopt.clip_by_global_norm(1.0), shardopt.adam(1e-2, EXACT_B1, EXACT_B2)
        ),
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0), optax.adam(1e-2, EXACT_B1, EXACT_B2)
        ),
    ),
    Row(
        "clip_trace_scale",
        lambda: shardopt.chain(
            shardopt.clip(0.05),
            shardopt.trace(0.5),
            shardopt.add_decayed_weights(1e-3),
            shardopt.scale(-0.1),
        ),
        lambda: optax.chain(
            optax.clip(0.05),
            optax.trace(0.5),
            optax.add_decayed_weights(1e-3),
            optax.scale(-0.1),
        ),
    ),
    Row(
        "scale_by_adam_exponential_decay",
        lambda: shardopt.chain(
            shardopt.scale_by_adam(b1=0.8),
            shardopt.scale_by_learning_rate(shardopt.exponential_decay(1e-2, 5, 0.9)),
        ),
        lambda: optax.chain(
            optax.scale_by_adam(b1=0.8),
            optax.scale_by_learning_rate(optax.exponential_decay(1e-2, 5, 0.9)),
        ),
        DECIMAL_BETAS_RTOL,
    ),
]
ROWS += [
    Row(
        "trace_scale_by_schedule",
        lambda: shardopt.chain(
            shardopt.trace(0.5),
            shardopt.scale_by_schedule(
                shardopt.piecewise_constant_schedule(-0.05, {10: 0.5})
            ),
        ),
        lambda: optax.chain(
            optax.trace(0.5),
            optax.scale_by_schedule(
                optax.piecewise_constant_schedule(-0.05, {10: 0.5})
            ),
        ),
    ),
]
ROWS += [
    # optax transforms inside shardopt: wrapped, and sharded by the plan like
    # native ones (their state leaves are matched to the parameters by path).
    Row(
        "optax_clip_in_shardopt_chain",
        lambda: shardopt.chain(
            optax.clip_by_global_norm(1.0), shardopt.adam(1e-2, EXACT_B1, EXACT_B2)
        ),
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0), optax.adam(1e-2, EXACT_B1, EXACT_B2)
        ),
    ),
    Row(
        "optax_adamw_as_the_transform",
        lambda: optax.adamw(1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1),
        lambda: optax.adamw(1e-2, EXACT_B1, EXACT_B2, weight_decay=0.1),
    ),
    Row(
        "optax_inside_shardopt_masked",
        lambda: shardopt.chain(
            shardopt.masked(optax.scale_by_adam(EXACT_B1, EXACT_B2), weight_mask),
            shardopt.scale(-1e-2),
        ),
        lambda: optax.chain(
            optax.masked(optax.scale_by_adam(EXACT_B1, EXACT_B2), weight_mask),
            optax.scale(-1e-2),
        ),
    ),
]


def _family_rows() -> list[Row]:
    """The rows of every ``tests/rows_<family>.py``: a catalogue family's entries.

    A new entry joins the table by adding a ``Row`` to its family's file; this
    table imports them all, so every test of the table runs it.
    """
    rows = []
    for path in sorted(pathlib.Path(__file__).parent.glob("rows_*.py")):
        rows += importlib.import_module(path.stem).ROWS
    return rows


ROWS += _family_rows()

# Catalogue entries that no row can build (they need what the table's step does
# not give: a loss value, per-example gradients), with the test that covers each.
TESTED_ELSEWHERE: dict[str, str] = {
    "constant_schedule": "tests/test_schedules.py (optax's values at every step)",
    "microbatch": "tests/test_microbatch.py (a function transform, no optimizer)",
}
for _path in sorted(pathlib.Path(__file__).parent.glob("rows_*.py")):
    TESTED_ELSEWHERE.update(
        getattr(importlib.import_module(_path.stem), "ELSEWHERE", {})
    )
ROWS_BY_NAME = {row.name: row for row in ROWS}
assert len(ROWS_BY_NAME) == len(ROWS), "two rows share a name"


def _fresh(make):
    """``make``'s arrays drawn once, then handed out as new device arrays.

    Drawing with ``jax.random`` compiles; the tests call these hundreds of
    times, with JAX's caches cleared between rows (see tests/conftest.py).
    Fresh arrays each call: a test may donate what it was given.
    """
    drawn = functools.cache(lambda seed: jax.tree.map(np.asarray, make(seed)))

    @functools.wraps(make)
    def fresh(seed: int = 0) -> dict[str, jax.Array]:
        return jax.tree.map(jnp.asarray, drawn(seed))

    return fresh


@_fresh
def make_params(seed: int = 0) -> dict[str, jax.Array]:
    """A scalar, a vector, a matrix and a cube with odd sizes; float32 and bfloat16."""
    keys = jax.random.split(jax.random.key(seed), 5)
    return {
        "scalar": jax.random.normal(keys[0], ()),
        "vector": jax.random.normal(keys[1], (7,)),
        "matrix": jax.random.normal(keys[2], (5, 3)),
        "cube": jax.random.normal(keys[3], (3, 5, 7)),
        "half": jax.random.normal(keys[4], (11, 3), jnp.bfloat16),
    }


@_fresh
def make_shardable_params(seed: int = 0) -> dict[str, jax.Array]:
    """The table's own tree: ``make_params``'s, with a dim of 8 or 16 in each
    array of 2+ dims (and odd dims beside them).

    Parity runs on it, and so does the sharded column: on 8 devices the ZeRO
    plan partitions the matrix, the cube and the bfloat16 leaf, while the
    scalar and the odd vector stay replicated. One tree for both means the
    unsharded reference reuses the parity run's compiled step.
    """
    keys = jax.random.split(jax.random.key(seed), 5)
    return {
        "scalar": jax.random.normal(keys[0], ()),
        "vector": jax.random.normal(keys[1], (7,)),
        "matrix": jax.random.normal(keys[2], (8, 3)),
        "cube": jax.random.normal(keys[3], (3, 5, 16)),
        "half": jax.random.normal(keys[4], (16, 3), jnp.bfloat16),
    }


def gradient(params, step):
    """A gradient that depends on the parameters and on the step (noise).

    The noise hashes the element's index, the leaf and the step with integer
    arithmetic (a multiply-xorshift mix), so it is bitwise the same on every
    layout of the leaf, and cheap to compile: ``jax.random`` in the step cost
    over a second of XLA compile per step function, the table's largest cost.
    """
    step = jnp.asarray(step, jnp.uint32)

    def leaf(salt, p):
        index = jnp.arange(p.size, dtype=jnp.uint32).reshape(p.shape)
        h = index * jnp.uint32(0x9E3779B1) + step * jnp.uint32(0x85EBCA77)
        h = h + jnp.uint32(salt * 0xC2B2AE3D % 2**32)
        h = (h ^ (h >> 15)) * jnp.uint32(0x2C1B3C6D)
        h = (h ^ (h >> 12)) * jnp.uint32(0x297A2D39)
        h = h ^ (h >> 15)
        eps = (h >> 8).astype(jnp.float32) * (3.0 / 2**24) - 1.5  # [-1.5, 1.5)
        return (p.astype(jnp.float32) * 0.5 + eps).astype(p.dtype)

    return {name: leaf(i, params[name]) for i, name in enumerate(sorted(params))}


TRACES = {"ours_step": 0}


@eqx.filter_jit(donate="all-except-first")
def ours_step(step, params, opt):
    """One step of the table, the parameters and the optimizer donated (as a
    training loop donates them): the runs are donated steps, and so is the
    step after a checkpoint round trip, with no program of its own."""
    TRACES["ours_step"] += 1  # Python side effect: runs once per compilation
    return opt.step(params, gradient(params, step))


@jax.jit
def _oracle_step(params, state, step, *, update):
    grads = gradient(params, step)
    updates, state = update(grads, state, params)
    return optax.apply_updates(params, updates), state


@dataclasses.dataclass
class OursRun:
    initial: shardopt.Optimizer  # donated to the first step: shapes and dtypes
    final: shardopt.Optimizer
    params: dict[str, jax.Array]
    compilations: int  # of ours_step, over all the steps of this run


def run_ours(row: Row, steps: int = STEPS, params=None, plan=None) -> OursRun:
    params = make_shardable_params() if params is None else params
    initial = opt = shardopt.Optimizer(row.ours(), params, plan=plan)
    before = TRACES["ours_step"]
    for step in range(steps):
        params, opt = ours_step(jnp.int32(step), params, opt)
    return OursRun(initial, opt, params, TRACES["ours_step"] - before)


def run_oracle(row: Row, steps: int = STEPS):
    params = make_shardable_params()
    transform = row.oracle()
    with jax.numpy_dtype_promotion("standard"):
        state = transform.init(params)
        step_fn = jax.jit(
            lambda p, s, i: _oracle_step.__wrapped__(p, s, i, update=transform.update)
        )
        for step in range(steps):
            params, state = step_fn(params, state, jnp.int32(step))
    return params


def relative_difference(ours, oracle) -> dict[str, float]:
    """Per leaf: max |ours - oracle| / max |oracle| (float64 arithmetic)."""

    def diff(a, b):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

    return {name: diff(ours[name], oracle[name]) for name in oracle}
