"""Benchmark shardopt.checkpoint against plain Orbax on ~350 MB of ZeRO-1 state.

Measures, for the same tree (an 8-layer MLP's parameters and its AdamW state,
moments partitioned over 8 devices): the full save (until written), the time
until ``save`` returns (async blocking), restore onto the same mesh, and restore
onto another mesh ((4, 2) with a model axis). Plain Orbax is
``ocp.StandardCheckpointer`` saving the same array leaves. Every restore of
shardopt verifies the checksums by default; the same restores with
``verify=False`` give the cost of that check. Each round saves every variant,
then runs all the restores interleaved, in an order rotated each round, each
after the one before has been freed and the freed memory handed back to the
system (glibc's ``malloc_trim``), so that every restore starts, as one at the
start of a job does, from fresh pages. Prints
the machine, a markdown table of medians and ratios, and paired ratios (the
median of per-round ratios: verified over plain Orbax, verified over
``verify=False``, ``verify=False`` over plain Orbax) in wall time and in this
process's CPU time (all threads), which moves less than wall time on a loaded
machine; and the CPU time of the check itself (the hashing threads' own time,
summed), which moves least, against the verified restore's CPU time.

    PYTHONPATH=. python scripts/bench_checkpoint.py [--repeats 5] [--dir /tmp/...]
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import ctypes
import gc
import shutil
import statistics
import tempfile
import threading
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from bench_common import cpu_model
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt.checkpoint import CheckpointManager, _verify


def build(width: int, layers: int):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    keys = jax.random.split(jax.random.key(0), layers)
    params = {
        f"layer{i}": {
            "w": jax.random.normal(k, (width, width), jnp.float32),
            "b": jnp.zeros((width,), jnp.float32),
        }
        for i, k in enumerate(keys)
    }
    opt = shardopt.Optimizer(shardopt.adamw(1e-3), params)
    grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
    params, opt = opt.step(params, grads)

    def zero1(x):
        spec = P("data") if x.ndim and x.shape[0] % 8 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    params = jax.device_put(params, NamedSharding(mesh, P()))
    opt = eqx.combine(
        jax.tree.map(zero1, eqx.filter(opt, eqx.is_array)),
        eqx.filter(opt, eqx.is_array, inverse=True),
    )
    return params, opt


def other_mesh_like(tree):
    """The same tree as ShapeDtypeStructs on a (4, 2) ('data', 'model') mesh."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))

    def spec(x):
        if x.ndim == 2:
            return P("data", "model")
        return P("data") if x.ndim == 1 else P()

    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x))
            )
            if eqx.is_array(x)
            else x
        ),
        tree,
    )


def same_like(tree):
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if eqx.is_array(x)
            else x
        ),
        tree,
    )


CPU_TIMES: dict[str, list[float]] = {}
CHECK_CPU = [0.0]  # the check's own CPU seconds (its threads'), this restore
_CHECK_LOCK = threading.Lock()


def _timing_the_check():
    """Sum the thread CPU time of every check: in the read and after it."""

    def timed(method):
        def wrapper(*args):
            start = time.thread_time()
            try:
                method(*args)
            finally:
                with _CHECK_LOCK:
                    CHECK_CPU[0] += time.thread_time() - start

        return wrapper

    for name in ("shard", "split"):
        setattr(_verify._LeafCheck, name, timed(getattr(_verify._LeafCheck, name)))


def _malloc_trim():
    """glibc's ``malloc_trim(0)``, where there is one: the heap's free memory
    handed back to the system."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


# Each restore starts from a heap that holds no freed memory, as a restore
# at the start of a job does: its buffers are fresh pages. Without this, a
# restore reused (or not) what the one before had freed, and its time
# depended on which variant ran before it (plain Orbax onto the same mesh,
# 338 MiB: 0.33 s after some variants, 0.67 s after others).
give_memory_back = _malloc_trim()


def timed(fn, cpu_key=None):
    """Wall seconds of ``fn`` until its arrays are ready (and its CPU seconds,
    all threads of this process, kept under ``cpu_key``)."""
    CHECK_CPU[0] = 0.0
    cpu = time.process_time()
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(eqx.filter(out, eqx.is_array))
    wall = time.perf_counter() - start
    if cpu_key is not None:
        CPU_TIMES.setdefault(cpu_key, []).append(time.process_time() - cpu)
        CPU_TIMES.setdefault("check/" + cpu_key, []).append(CHECK_CPU[0])
    return wall, out


def machine() -> str:
    """The CPU model, core count and load, for the record."""
    model = cpu_model()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir or "/tmp")
    try:
        run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args, root):
    _timing_the_check()
    started = machine()
    params, opt = build(args.width, args.layers)
    arrays = {"params": params, "opt": eqx.filter(opt, eqx.is_array)}
    nbytes = sum(x.nbytes for x in jax.tree.leaves(arrays))
    like_same = same_like({"params": params, "opt": opt})
    like_other = other_mesh_like({"params": params, "opt": opt})
    plain_same = {
        "params": like_same["params"],
        "opt": eqx.filter(
            like_same["opt"], lambda x: isinstance(x, jax.ShapeDtypeStruct)
        ),
    }
    plain_other = {
        "params": like_other["params"],
        "opt": eqx.filter(
            like_other["opt"], lambda x: isinstance(x, jax.ShapeDtypeStruct)
        ),
    }

    keys = ("save", "block", "restore", "reshard", "restore_nv", "reshard_nv")
    variants = ("orbax", "shardopt", "no_checksums")
    results = {name: {k: [] for k in keys} for name in variants}
    for rep in range(args.repeats + 1):  # the first round warms up
        # every variant saves first, then all restores run interleaved, in an
        # order rotated each round (a fixed order favoured or penalised some)
        restores = []
        path = os.path.join(root, f"plain{rep}")
        ckptr = ocp.StandardCheckpointer()
        start = time.perf_counter()
        ckptr.save(path, arrays)
        block = time.perf_counter() - start
        ckptr.wait_until_finished()
        save = time.perf_counter() - start
        saved = {"orbax": (save, block)}
        for key, like in (("restore", plain_same), ("reshard", plain_other)):
            restores.append(
                ("orbax", key, lambda c=ckptr, p=path, t=like: c.restore(p, t))
            )
        managers = []
        for variant, checksums in (("shardopt", True), ("no_checksums", False)):
            manager = CheckpointManager(
                os.path.join(root, f"{variant}{rep}"), checksums=checksums
            )
            managers.append(manager)
            start = time.perf_counter()
            manager.save(1, params=params, opt=opt)
            block = time.perf_counter() - start
            manager.wait()
            saved[variant] = (time.perf_counter() - start, block)
            for key, like, verify in (
                ("restore", like_same, None),
                ("reshard", like_other, None),
                ("restore_nv", like_same, False),
                ("reshard_nv", like_other, False),
            ):
                restores.append(
                    (
                        variant,
                        key,
                        lambda m=manager, t=like, v=verify: m.restore(
                            params=t["params"], opt=t["opt"], verify=v
                        ),
                    )
                )
        shift = rep % len(restores)
        for variant, key, fn in restores[shift:] + restores[:shift]:
            wall, got = timed(fn, f"{key}/{variant}{rep}" if rep else None)
            if rep:
                results[variant][key].append(wall)
            if rep == 0 and variant == "shardopt" and key == "restore":
                # on the host: a jitted comparison would all-reduce over 8
                # devices, which XLA:CPU aborts after 40 s on a starved machine
                got_leaves = jax.tree.leaves(eqx.filter(got.opt, eqx.is_array))
                assert all(
                    np.array_equal(np.asarray(a), np.asarray(b))
                    for a, b in zip(
                        got_leaves, jax.tree.leaves(arrays["opt"]), strict=True
                    )
                )
            # the restored arrays freed, and the memory given back, before
            # the next restore is timed (measured: the spread of the ratios
            # between runs fell from ~0.2 to ~0.03)
            del got
            gc.collect()
            give_memory_back()
            time.sleep(0.05)
        if rep:  # plain Orbax has no verify switch: the same numbers twice
            for key, nv in (("restore", "restore_nv"), ("reshard", "reshard_nv")):
                results["orbax"][nv].append(results["orbax"][key][-1])
                CPU_TIMES[f"{nv}/orbax{rep}"] = CPU_TIMES[f"{key}/orbax{rep}"]
            for variant, (save, block) in saved.items():
                results[variant]["save"].append(save)
                results[variant]["block"].append(block)
        ckptr.close()
        for manager in managers:
            manager.close()
        shutil.rmtree(path)
        for variant in ("shardopt", "no_checksums"):
            shutil.rmtree(os.path.join(root, f"{variant}{rep}"))

    labels = {
        "save": "save (until written)",
        "block": "save returns (async blocking)",
        "restore": "restore, same mesh (8,)",
        "reshard": "restore onto (4, 2) mesh",
        "restore_nv": "restore, same mesh, verify=False",
        "reshard_nv": "restore onto (4, 2), verify=False",
    }
    print(
        f"{nbytes / 2**20:.0f} MiB of params + AdamW state, {jax.device_count()} "
        f"devices, median of {args.repeats}\nmachine: {started}; at the end: "
        f"{machine()}\n"
    )
    print(
        "| operation | plain Orbax (s) | shardopt, default (s) | ratio "
        "| shardopt, checksums=False (s) | ratio |"
    )
    print("|---|---|---|---|---|---|")
    for key, label in labels.items():
        a = statistics.median(results["orbax"][key])
        b = statistics.median(results["shardopt"][key])
        c = statistics.median(results["no_checksums"][key])
        print(
            f"| {label} | {a:.3f} | {b:.3f} | {b / a:.2f}x | {c:.3f} | {c / a:.2f}x |"
        )
    print(
        "\npaired, median of the per-round ratios (wall time; CPU time of this "
        "process, all threads):"
    )

    def paired(a_key, a_variant, b_key, b_variant):
        walls = [
            a / b
            for a, b in zip(
                results[a_variant][a_key], results[b_variant][b_key], strict=True
            )
        ]
        cpus = [
            CPU_TIMES[f"{a_key}/{a_variant}{rep}"][0]
            / CPU_TIMES[f"{b_key}/{b_variant}{rep}"][0]
            for rep in range(1, args.repeats + 1)
        ]
        return (
            f"{statistics.median(walls):.3f}x wall, {statistics.median(cpus):.3f}x CPU"
        )

    for key, nv in (("restore", "restore_nv"), ("reshard", "reshard_nv")):
        print(
            f"- {labels[key]}: verified / plain Orbax "
            f"{paired(key, 'shardopt', key, 'orbax')}; verified / verify=False "
            f"{paired(key, 'shardopt', nv, 'shardopt')}; verify=False / plain "
            f"Orbax {paired(nv, 'shardopt', key, 'orbax')}"
        )
    print("\nthe check's own CPU time (its threads', summed), median per restore:")
    for key in ("restore", "reshard"):
        rounds = range(1, args.repeats + 1)
        check = [CPU_TIMES[f"check/{key}/shardopt{rep}"][0] for rep in rounds]
        total = [CPU_TIMES[f"{key}/shardopt{rep}"][0] for rep in rounds]
        share = statistics.median(c / t for c, t in zip(check, total, strict=True))
        print(
            f"- {labels[key]}: {statistics.median(check) * 1e3:.1f} ms, "
            f"{nbytes / statistics.median(check) / 1e9:.1f} GB/s, {share:.1%} of "
            "the verified restore's CPU time"
        )


if __name__ == "__main__":
    main()
