"""``shardopt-ckpt``: inspect, verify and export checkpoints from the shell."""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from rich.progress import Progress

from . import _checksum
from ._checksum import check
from ._errors import CheckpointError
from ._handler import ChecksumRestore
from ._manager import CheckpointManager
from ._tree import replicated

ARRAY_ITEMS = ("params", "opt_state", "opt_hyperparameters", "extras")


def _nested(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        keys = path.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return out


def _flat(nested: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in nested.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flat(value, path))
        else:
            out[path] = value
    return out


def _read(ckpt: CheckpointManager, step: int, meta: dict, items, progress=None):
    """Read whole arrays of ``items`` onto one device, item by item."""
    out = {}
    task = None
    if progress is not None:
        total = sum(
            d["bytes"] for i in items for d in meta["leaves"].get(i, {}).values()
        )
        task = progress.add_task("reading", total=total)
    for item in items:
        leaves = meta["leaves"].get(item, {})
        if not leaves:
            continue
        target = _nested(
            {
                p: jax.ShapeDtypeStruct(
                    tuple(d["shape"]), np.dtype(d["dtype"]), sharding=replicated(None)
                )
                for p, d in leaves.items()
            }
        )
        got = ckpt._read_arrays(step, {item: target})
        out[item] = {p: np.asarray(x) for p, x in _flat(got[item]).items()}
        if task is not None:
            progress.update(task, advance=sum(d["bytes"] for d in leaves.values()))
    return out


def _open_step(args) -> tuple[CheckpointManager, int, dict]:
    """The manager of ``args.dir``, the step asked for (or the latest), its record."""
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise CheckpointError(
            f"{args.dir} is a file, not a checkpoint directory: pass the directory "
            f"that holds the step folders{_root_hint(args.dir)}"
        )
    if not os.path.isdir(args.dir):
        raise CheckpointError(f"{args.dir}: no such directory")
    ckpt = CheckpointManager(args.dir, create=False)
    if not ckpt.all_steps():
        raise CheckpointError(f"{args.dir}: no fully written checkpoint step")
    step = ckpt._resolve(args.step)
    return ckpt, step, ckpt.metadata(step)


def _root_hint(path: str) -> str:
    """`` (here: ROOT)`` when ``path`` lies inside a step of a checkpoint."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent != os.path.dirname(parent):
        if os.path.basename(parent).isdigit():
            return f" (here: {os.path.dirname(parent)})"
        parent = os.path.dirname(parent)
    return ""


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inspect(args) -> int:
    ckpt, step, meta = _open_step(args)
    print(f"checkpoint {ckpt.directory}")
    print(f"steps: {ckpt.all_steps()}  (showing {step}, saved {meta['saved_at']})")
    layout = meta["layout"]
    meshes = "; ".join(
        "(" + ", ".join(f"{k}={v}" for k, v in m["axes"].items()) + ")"
        for m in layout["meshes"]
    )
    print(
        f"saved from: {layout['process_count']} process(es), "
        f"{layout['device_count']} {layout['platform']} device(s), "
        f"mesh {meshes or 'none'}"
        + (f", plan {layout['plan']}" if "plan" in layout else "")
    )
    if meta["metadata"]:
        print(f"metadata: {json.dumps(meta['metadata'])}")
    if meta["data"] is not None:
        print(f"data: {json.dumps(meta['data'])}")
    total = 0
    for item, leaves in meta["leaves"].items():
        if not leaves:
            continue
        size = sum(d["bytes"] for d in leaves.values())
        total += size
        print(f"\n{item}: {len(leaves)} arrays, {_size(size)}")
        width = max(len(p) for p in leaves)
        for path, d in leaves.items():
            shape = ",".join(str(s) for s in d["shape"])
            print(
                f"  {path:<{width}}  {d['dtype']}[{shape}]".ljust(width + 24)
                + f" {_size(d['bytes']):>10}  {d['layout']}"
            )
    count = sum(len(v) for v in meta["leaves"].values())
    print(f"\ntotal: {count} arrays, {_size(total)}")
    return 0


def verify(args) -> int:
    ckpt, step, meta = _open_step(args)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        arrays = _read(ckpt, step, meta, ARRAY_ITEMS, progress)
    recorded = meta.get("checksums", True)
    records = []
    if recorded:
        records = ckpt._manager.restore(
            step, args=ocp.args.Composite(checksums=ChecksumRestore())
        )["checksums"]
    by_leaf: dict = {}
    for record in records:
        by_leaf.setdefault(record["leaf"], []).append(record)
    problems = []
    checked = 0
    for i, name in enumerate(meta["checksum_order"]):
        item, path = name.split("/", 1)
        value = arrays[item][path]
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            problems.append(f"{name}: not finite")
        found = by_leaf.get(i, [])
        if not recorded:
            checked += 1
            continue
        if not found or any(_checksum.recorded(r)[1] is None for r in found):
            problems.append(f"{name}: no checksum recorded")
        problem = check(value, found)
        if problem:
            problems.append(f"{name}: {problem}")
        checked += 1
    for line in problems:
        print(f"FAIL {line}")
    if problems:
        print(f"step {step}: {len(problems)} problem(s) in {checked} arrays")
        return 1
    if not recorded:
        print(
            f"step {step}: OK, {checked} arrays readable and finite; no checksums "
            "to compare (saved with checksums=False)"
        )
        return 0
    print(f"step {step}: OK, {checked} arrays readable, finite, checksums match")
    return 0


def export(args) -> int:
    ckpt, step, meta = _open_step(args)
    if not meta["leaves"].get("params"):
        raise CheckpointError(f"step {step} in {args.dir} holds no parameters")
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        params = _read(ckpt, step, meta, ("params",), progress)["params"]
    if args.out.endswith(".npz"):
        np.savez(args.out, **params)
    else:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.abspath(args.out), _nested(params))
        checkpointer.wait_until_finished()
        checkpointer.close()
    size = sum(x.nbytes for x in params.values())
    print(
        f"wrote {len(params)} parameter arrays ({_size(size)}) of step {step} "
        f"to {args.out}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shardopt-ckpt", description="Inspect, verify and export checkpoints."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="steps, every array, totals, metadata, layout")
    p.add_argument("dir")
    p.add_argument("--step", type=int)
    p.set_defaults(run=inspect)
    p = sub.add_parser("verify", help="every array readable, finite, checksum matching")
    p.add_argument("dir")
    p.add_argument("--step", type=int)
    p.set_defaults(run=verify)
    p = sub.add_parser("export", help="a parameters-only checkpoint or .npz")
    p.add_argument("dir")
    p.add_argument("--step", type=int)
    p.add_argument("--params-only", action="store_true", required=True)
    p.add_argument("out", help="an Orbax directory, or a file ending in .npz")
    p.set_defaults(run=export)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except Exception as err:  # one clear line, not a traceback
        text = str(err).strip().splitlines()
        print(
            f"shardopt-ckpt: error: {text[0] if text else type(err).__name__}",
            file=sys.stderr,
        )
        return 2
