"""Flat buffers against leaf-by-leaf storage: AdamW on 1M float32 parameters
split into 10, 100, 1,000 and 10,000 leaves of the same total size.

For each tree and storage it prints trace and compile time of one step and the
median update time (repeats interleaved across all variants, so a loaded
machine slows them alike), beside a floor: the program that only adds a
gradient to each leaf (``p + g``, leaf by leaf), the least any step that takes
and returns the parameters as a tree of that many arrays can do. Also the
bytes an update must move (AdamW reads g, p, mu, nu and writes p, mu, nu; the
floor reads g, p and writes p) and that rate as a fraction of a large array
copy's measured bandwidth in the same run.

    PYTHONPATH=. python scripts/bench_flat.py [--leaves 10 100 1000 10000]
        [--total 1000000] [--repeats 30] [--per-leaf-max 1000]
        [--max-leaves 10000] [--zero STAGE]

``--zero STAGE`` runs both storages under ``shardopt.zero(STAGE, mesh)`` on a
1-D data mesh of all devices (``min_size=0``; for simulated CPU devices set
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before the run): the
flat buffers are then each device's shards packed (docs/optimizer.md, "Flat
buffers under a ZeRO plan"), and the gradients are given in the plan's
gradient layout. The floor is run without a plan only.

Leaf-by-leaf compiles take minutes at 10,000 leaves, so storage per leaf is
measured up to ``--per-leaf-max`` leaves only; ``--max-leaves`` drops larger
trees altogether. The machine's load average is printed before and after:
the numbers of a loaded machine are slower and noisier.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import shardopt

BYTES_PER_PARAM = {  # float32: what one update reads and writes per parameter
    "flat": 7 * 4,  # AdamW: reads g, p, mu, nu; writes p, mu, nu
    "per leaf": 7 * 4,
    "floor": 3 * 4,  # reads g, p; writes p
}


def tree(n_leaves: int, total: int) -> dict[str, jax.Array]:
    size = total // n_leaves
    keys = jax.random.split(jax.random.key(0), n_leaves)
    return {
        f"w{i:05d}": jax.random.normal(k, (size,), jnp.float32) * 0.01
        for i, k in enumerate(keys)
    }


class Variant:
    """One (tree, storage) pair: its compiled step and its live arrays.

    ``storage``: "flat" or "per leaf" (AdamW with ``fuse=True``/``False``,
    under ``shardopt.zero(zero, mesh)`` where ``zero`` is a stage), or
    "floor" (``p + g`` leaf by leaf, no optimizer; without a plan only).
    """

    def __init__(self, n_leaves: int, total: int, storage: str, zero: int | None):
        self.name = f"{n_leaves} leaves, {storage}"
        self.n_leaves, self.storage = n_leaves, storage
        self.params = tree(n_leaves, total)
        self.grads = jax.tree.map(lambda x: x * 0.5 + 1e-3, self.params)
        plan = None
        if zero is not None:
            mesh = jax.make_mesh((jax.device_count(),), ("data",))
            plan = shardopt.zero(zero, mesh, min_size=0)
            self.params = plan.shard_params(self.params)
            self.grads = jax.device_put(self.grads, plan.grad_shardings(self.params))
        if storage == "floor":
            self.opt_arrays = None

            def step(params, opt_arrays, grads):
                return jax.tree.map(jnp.add, params, grads), opt_arrays

        else:
            fuse = storage == "flat"
            opt = shardopt.Optimizer(
                shardopt.adamw(1e-3), self.params, plan=plan, fuse=fuse
            )
            self.opt_arrays, static = eqx.partition(opt, eqx.is_array)

            def step(params, opt_arrays, grads):
                params, new = eqx.combine(opt_arrays, static).step(params, grads)
                return params, eqx.filter(new, eqx.is_array)

        jitted = jax.jit(step, donate_argnums=(0, 1))
        start = time.perf_counter()
        lowered = jitted.lower(self.params, self.opt_arrays, self.grads)
        self.trace_s = time.perf_counter() - start
        start = time.perf_counter()
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        self.times: list[float] = []
        self.run()  # warm

    def run(self) -> float:
        start = time.perf_counter()
        self.params, self.opt_arrays = self.compiled(
            self.params, self.opt_arrays, self.grads
        )
        jax.block_until_ready((self.params, self.opt_arrays))
        return time.perf_counter() - start


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second of a jitted copy (read + write) of a large array."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * jnp.float32(1.0000001))
    copy(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--total", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--per-leaf-max", type=int, default=1000)
    parser.add_argument("--max-leaves", type=int, default=10000)
    parser.add_argument("--zero", type=int, default=None, choices=(0, 1, 2, 3))
    args = parser.parse_args()
    args.leaves = [n for n in args.leaves if n <= args.max_leaves]

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{args.total:,} float32 parameters, AdamW"
        + (
            ""
            if args.zero is None
            else f", ZeRO stage {args.zero} on {jax.device_count()} devices"
        )
    )
    print(f"# load average at start: {load()}", flush=True)
    variants = []
    for n in args.leaves:
        for storage in ("flat", "per leaf", "floor"):
            if storage == "per leaf" and n > args.per_leaf_max:
                continue
            if storage == "floor" and args.zero is not None:
                continue
            variants.append(Variant(n, args.total, storage, args.zero))
            v = variants[-1]
            print(
                f"compiled {v.name}: trace {v.trace_s:.2f} s, "
                f"compile {v.compile_s:.2f} s",
                flush=True,
            )
    bandwidth = copy_bandwidth(64 * 2**20, args.repeats)
    for _ in range(args.repeats):  # interleaved: every variant once per round
        for v in variants:
            v.times.append(v.run())

    print(f"# load average at end: {load()}")
    base = {
        v.storage: statistics.median(v.times)
        for v in variants
        if v.n_leaves == min(args.leaves)
    }
    print(f"\ncopy bandwidth: {bandwidth / 1e9:.2f} GB/s (64 MiB array, median)")
    print(
        f"| leaves | storage | trace + compile (s) | update (ms) "
        f"| vs {min(args.leaves):,} leaves "
        "| bytes moved / copy bandwidth |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for v in variants:
        t = statistics.median(v.times)
        moved = BYTES_PER_PARAM[v.storage] * args.total
        print(
            f"| {v.n_leaves:,} | {v.storage} | {v.trace_s + v.compile_s:.2f} "
            f"| {1e3 * t:.2f} | {t / base[v.storage]:.2f}x "
            f"| {moved / t / bandwidth:.2f} |"
        )


if __name__ == "__main__":
    main()
