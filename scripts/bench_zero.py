"""Benchmark ZeRO stages 0-3 of shardopt against optax with hand-written sharding.

On 8 simulated CPU devices (one "data" axis), for a ~29M-parameter Equinox MLP
and a small decoder-only transformer, both trained with AdamW, and for each
ZeRO stage, it measures:

- optimizer-state bytes per device (from the live arrays' addressable shards)
  and their ratio to the ideal, total state bytes / data-parallel size;
- parameter bytes per device;
- the collectives in the compiled training step, by kind, for shardopt and for
  the optax baseline;
- the step time of shardopt (``opt.plan.value_and_grad`` + ``opt.step``) as a
  ratio to optax in the same layout, written by hand: ``jax.jit`` with
  in/out shardings, moments placed with ``optax.tree_map_params``, gradients
  constrained to the partitioned layout at stage 2, parameters partitioned and
  gathered explicitly (constraint to replicated) at stage 3. Steps alternate
  between the two (paired, the order flipping each step); the ratio is of
  medians.

Prints a markdown table.

    PYTHONPATH=. python scripts/bench_zero.py [--steps 40] [--models mlp,transformer]
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_common import (
    MiB,
    Transformer,
    compile_and_count,
    nbytes_per_device,
    optax_shardings,
    total_bytes,
)
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt import sharding as sh

LR, WD = 1e-3, 1e-4


def mlp_case(batch):
    model = eqx.nn.MLP(1024, 1024, 2048, 7, key=jax.random.key(0))

    def loss(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    kx, ky = jax.random.split(jax.random.key(1))
    data = (jax.random.normal(kx, (batch, 1024)), jax.random.normal(ky, (batch, 1024)))
    return model, loss, data


def transformer_case(batch):
    seq = 64
    model = Transformer(2048, 256, 4, 4, seq, jax.random.key(0))

    def loss(model, tokens):
        logits = jax.vmap(model)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, 2048)
    return model, loss, (tokens,)


CASES = {"mlp": (mlp_case, 32), "transformer": (transformer_case, 16)}


# ------------------------------------------------------------------ steps
def shardopt_step(plan, model, loss):
    """The shardopt training step: explicit-collective grads, then opt.step."""
    params = plan.shard_params(model)
    opt = shardopt.Optimizer(shardopt.adamw(LR, weight_decay=WD), params, plan=plan)
    value_and_grad = opt.plan.value_and_grad(loss)

    @eqx.filter_jit(donate="all-except-first")
    def step(batch, params, opt):
        value, grads = value_and_grad(params, *batch)
        params, opt = opt.step(params, grads)
        return value, params, opt

    return step, params, opt


def optax_step(plan, model, loss):
    """optax with the same layout, sharded by hand (what users write today)."""
    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    rep = NamedSharding(plan.mesh, P())
    stage = plan.stage
    tx = optax.adamw(LR, weight_decay=WD)
    param_sh, grad_sh, state_sh = optax_shardings(plan, arrays, tx)
    # from host copies: never sharing a buffer with the shardopt side's params
    params = jax.device_put(jax.tree.map(np.asarray, arrays), param_sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)

    def full_loss(params, *batch):
        if stage >= 3:  # FSDP: gather the parameters explicitly before use
            params = jax.lax.with_sharding_constraint(
                params, jax.tree.map(lambda _: rep, params)
            )
        return loss(eqx.combine(params, static), *batch)

    def step(batch, params, state):
        value, grads = jax.value_and_grad(full_loss)(params, *batch)
        grads = jax.lax.with_sharding_constraint(grads, grad_sh)
        updates, state = tx.update(grads, state, params)
        updates = jax.lax.with_sharding_constraint(updates, param_sh)
        return value, optax.apply_updates(params, updates), state

    jitted = jax.jit(
        step,
        in_shardings=(None, param_sh, state_sh),
        out_shardings=(rep, param_sh, state_sh),
        donate_argnums=(1, 2),
    )
    return jitted, params, state


def run_case(name, stage, steps, min_size, bucket_bytes):
    make, batch_size = CASES[name]
    model, loss, data = make(batch_size)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    plan = shardopt.zero(stage, mesh, min_size=min_size, bucket_bytes=bucket_bytes)
    batch = tuple(jax.device_put(a, NamedSharding(mesh, P("data"))) for a in data)

    s_step, s_params, s_opt = shardopt_step(plan, model, loss)
    o_step, o_params, o_state = optax_step(plan, model, loss)

    state_dev = nbytes_per_device((s_opt.state, s_opt.count), mesh)
    state_total = total_bytes((s_opt.state, s_opt.count))
    ideal = state_total / plan.data_size
    param_dev = nbytes_per_device(s_params, mesh)
    o_state_dev = nbytes_per_device(o_state, mesh)
    s_step, s_coll = compile_and_count(s_step, batch, s_params, s_opt)
    o_step, o_coll = compile_and_count(o_step, batch, o_params, o_state)

    # warm up (compile) both, then paired timed steps, order flipping each step
    _, s_params, s_opt = jax.block_until_ready(s_step(batch, s_params, s_opt))
    _, o_params, o_state = jax.block_until_ready(o_step(batch, o_params, o_state))
    s_times, o_times = [], []
    for i in range(steps):
        order = ("s", "o") if i % 2 == 0 else ("o", "s")
        for which in order:
            t0 = time.perf_counter()
            if which == "s":
                out = s_step(batch, s_params, s_opt)
                _, s_params, s_opt = jax.block_until_ready(out)
                s_times.append(time.perf_counter() - t0)
            else:
                out = o_step(batch, o_params, o_state)
                _, o_params, o_state = jax.block_until_ready(out)
                o_times.append(time.perf_counter() - t0)
    s_med, o_med = statistics.median(s_times), statistics.median(o_times)
    ratios = [s / o for s, o in zip(s_times, o_times, strict=True)]
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    return {
        "model": f"{name} ({n_params / 1e6:.1f}M)",
        "stage": stage,
        "state": state_dev / MiB,
        "ratio_ideal": state_dev / ideal,
        "optax_state": o_state_dev / MiB,
        "params": param_dev / MiB,
        "coll": s_coll,
        "optax_coll": o_coll,
        "s_ms": 1e3 * s_med,
        "o_ms": 1e3 * o_med,
        "ratio": s_med / o_med,
        "pair_spread": (min(ratios), max(ratios)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side")
    parser.add_argument("--models", default="mlp,transformer")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument(
        "--min-size",
        type=int,
        default=256,
        help="plan min_size: leaves with fewer elements stay replicated",
    )
    parser.add_argument(
        "--bucket-bytes",
        type=int,
        default=sh.BUCKET_BYTES,
        help="plan bucket_bytes: smaller gradients share a reduce-scatter",
    )
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} "
        f"devices, {os.cpu_count()} CPU cores; AdamW; {args.steps} paired steps; "
        f"zero(stage, mesh, min_size={args.min_size}, "
        f"bucket_bytes={args.bucket_bytes})",
        flush=True,
    )
    rows = []
    for name in args.models.split(","):
        for stage in (int(s) for s in args.stages.split(",")):
            t0 = time.perf_counter()
            row = run_case(name, stage, args.steps, args.min_size, args.bucket_bytes)
            rows.append(row)
            print(
                f"  {row['model']} stage {stage}: {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    print()
    print(
        "| model | stage | opt state / device (MiB) | x ideal | optax state / device "
        "(MiB) | params / device (MiB) | collectives in step (shardopt) | "
        "collectives (optax) | shardopt step (ms) | optax step (ms) | time ratio "
        "| per-pair ratio range |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["pair_spread"]
        print(
            f"| {r['model']} | {r['stage']} | {r['state']:.2f} | "
            f"{r['ratio_ideal']:.3f} | {r['optax_state']:.2f} | {r['params']:.2f} | "
            f"{r['coll']} | {r['optax_coll']} | {r['s_ms']:.0f} | {r['o_ms']:.0f} | "
            f"{r['ratio']:.2f} | {lo:.2f}-{hi:.2f} |"
        )


if __name__ == "__main__":
    main()
