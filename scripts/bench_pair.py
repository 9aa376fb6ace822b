"""Paired update timings with an A/A control, for a loaded machine.

For each ``optimizer:model`` case of the suite (scripts/bench.py), one
process builds shardopt's update under ``jit_step``, optax's jitted update,
and optax's again (the A/A control: its ratio to the first shows how far the
machine's noise alone moves a ratio), then runs them interleaved, the order
reversing each round, and prints each side's median update time and its
ratio to optax's, with the ratio of the minima in brackets.

``--devices 8`` runs each case on a mesh of that many devices under
``shardopt.zero(--stage, mesh)``, against optax sharded by hand to the same
layout (the suite's "optax sharded").

``--base DIR`` adds an older shardopt: DIR holds it as a package named
``shardopt_base``, e.g.::

    git archive 43b8fcb shardopt | tar -x -C /tmp/base
    mv /tmp/base/shardopt /tmp/base/shardopt_base
    sed -i 's/from shardopt\\./from shardopt_base./' \\
        /tmp/base/shardopt_base/sharding/_state.py

    PYTHONPATH=.:scripts python scripts/bench_pair.py --rounds 60 \\
        sgd:leaves10 lion:mlp [--base /tmp/base]
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import importlib
import statistics
import sys

import bench
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt


def build(case: str, base: object, devices: int, stage: int) -> dict:
    optimizer, model_name = case.split(":")
    make_s, make_o = bench.OPTIMIZERS[optimizer]
    model, loss, batch = bench.MODELS[model_name]()
    mesh = plan = None
    if devices > 1:  # as the suite's sections: optax sharded by hand to the plan
        mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
        plan = shardopt.zero(stage, mesh, min_size=64)
        batch = tuple(jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batch)
    packages = {"shardopt": shardopt} | ({"before": base} if base else {})
    sides = {}
    for name, package in packages.items():
        bench.shardopt = package  # the suite's constructors read this global
        try:
            sides[name] = bench.shardopt_sides(make_s, model, loss, batch, plan)[0]
        finally:
            bench.shardopt = shardopt
    for name in ("optax", "optax again"):
        sides[name] = bench.optax_side(make_o, model, loss, batch, plan, mesh)
    for side in sides.values():
        side.step = None  # the update alone
        side.warm_up()
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="+", help="optimizer:model, e.g. sgd:leaves10")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--base", default=None, help="a directory with shardopt_base")
    parser.add_argument(
        "--devices", type=int, default=1, help="on a mesh: optax sharded by hand"
    )
    parser.add_argument("--stage", type=int, default=1, help="ZeRO stage on a mesh")
    args = parser.parse_args()
    base = None
    if args.base:
        sys.path.insert(0, args.base)
        base = importlib.import_module("shardopt_base")
    print(bench.machine())
    for case in args.cases:
        sides = build(case, base, args.devices, args.stage)
        load = os.getloadavg()[0]
        for r in range(args.rounds):
            for side in list(sides.values())[:: 1 if r % 2 == 0 else -1]:
                side.measure()
        median = {k: statistics.median(s.times["update"]) for k, s in sides.items()}
        least = {k: min(s.times["update"]) for k, s in sides.items()}
        cells = "; ".join(
            f"{k} {1e3 * median[k]:.3f} ms {median[k] / median['optax']:.2f} "
            f"({least[k] / least['optax']:.2f})"
            for k in sides
        )
        print(f"{case}: {cells}; load {load:.1f}-{os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
