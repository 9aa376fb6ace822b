"""Step time of ZeRO stages 2-3 with and without gradient buckets, against optax.

For each model and stage, one process builds the shardopt step for every
``bucket_bytes`` asked for (0 = one reduce-scatter per gradient) and optax's
hand-sharded step (both from ``bench_zero.py``), then runs them interleaved, the
order reversing each round, so that all sides see the same machine load. Prints
a markdown table of median step times and their ratio to optax.

    PYTHONPATH=. python scripts/bench_buckets.py [--steps 40] [--buckets 0,4194304]
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import statistics
import time

import jax
import numpy as np
from bench_zero import CASES, compile_and_count, optax_step, shardopt_step
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt


def fresh(model):
    """A copy of ``model`` that shares no buffer with it (each side donates)."""
    return jax.tree.map(
        lambda x: jax.numpy.array(np.asarray(x)) if isinstance(x, jax.Array) else x,
        model,
    )


def run(name, stage, buckets, steps, min_size):
    make, batch_size = CASES[name]
    model, loss, data = make(batch_size)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = tuple(jax.device_put(a, NamedSharding(mesh, P("data"))) for a in data)
    sides, collectives = {}, {}
    for bucket_bytes in buckets:
        plan = shardopt.zero(stage, mesh, min_size=min_size, bucket_bytes=bucket_bytes)
        step, params, opt = shardopt_step(plan, fresh(model), loss)
        step, collectives[bucket_bytes] = compile_and_count(step, batch, params, opt)
        sides[bucket_bytes] = [step, params, opt]
    step, params, state = optax_step(plan, fresh(model), loss)
    step, collectives["optax"] = compile_and_count(step, batch, params, state)
    sides["optax"] = [step, params, state]
    times = {key: [] for key in sides}
    for i in range(steps + 1):  # round 0 warms up
        for key in list(sides) if i % 2 else list(sides)[::-1]:
            step, params, state = sides[key]
            t0 = time.perf_counter()
            _, params, state = jax.block_until_ready(step(batch, params, state))
            if i:
                times[key].append(time.perf_counter() - t0)
            sides[key][1:] = [params, state]
    medians = {key: statistics.median(t) for key, t in times.items()}
    return medians, collectives


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed rounds")
    parser.add_argument("--models", default="transformer,mlp")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--buckets", default=f"0,{shardopt.sharding.BUCKET_BYTES}")
    parser.add_argument("--min-size", type=int, default=256)
    args = parser.parse_args()
    buckets = [int(b) for b in args.buckets.split(",")]
    print(
        f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} "
        f"devices, {os.cpu_count()} CPU cores; AdamW; {args.steps} interleaved "
        f"rounds; min_size={args.min_size}",
        flush=True,
    )
    print()
    print(
        "| model | stage | bucket_bytes | collectives in step | step (ms) | optax "
        "step (ms) | ratio to optax |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for stage in (int(s) for s in args.stages.split(",")):
            medians, collectives = run(name, stage, buckets, args.steps, args.min_size)
            optax_ms = 1e3 * medians["optax"]
            for bucket_bytes in buckets:
                ms = 1e3 * medians[bucket_bytes]
                print(
                    f"| {name} | {stage} | {bucket_bytes:,} | "
                    f"{collectives[bucket_bytes]} | {ms:.0f} | "
                    f"{optax_ms:.0f} | {ms / optax_ms:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
