"""Save on 8 devices at ZeRO-3, restore on 4 devices at ZeRO-1, continue training.

    python examples/restore_on_new_mesh.py [--steps N] [--out DIR]

The character GPT of ``equinox_gpt.py`` trains for half of its steps on a mesh
of 8 devices with parameters, gradients and moments partitioned (ZeRO-3), and
is checkpointed. One run then continues there to the end: the uninterrupted
reference. The checkpoint is restored onto a mesh of the first 4 devices at
ZeRO-1 (whole parameters, moments partitioned in 4), straight into that layout
from abstract targets, and trains to the end too. The script prints the checks:

- the restored parameters and optimizer state equal the saved ones, bit for bit;
- the losses and final parameters of the continued run equal the reference's
  to rounding. Not bit for bit: each step's gradient is a mean over 4 data
  shards instead of 8, summed in another order (about 1e-7 relative per step).

It exits with status 1 if a check fails, and plots both runs' losses.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import equinox as eqx
import jax
import numpy as np
from equinox_gpt import Config, build, read_corpus, train
from jax.sharding import Mesh

import shardopt

RTOL = 1e-5  # measured: ~2e-7 after 100 steps on another shard count


def host_arrays(*trees: object) -> list[np.ndarray]:
    """Every array leaf of ``trees``, copied to the host (before donation)."""
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(trees, eqx.is_array))]


def layout_of(opt: shardopt.Optimizer) -> str:
    """The first-block qkv first moment's spec and device count, for the printout."""
    mu = opt.state[1][0].mu.blocks[0].qkv.weight
    return f"{mu.sharding.spec} over {len(mu.sharding.device_set)} devices"


def main(argv: list[str] | None = None) -> dict:
    """Run both paths and the checks; returns the losses and the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Config(steps=100, width=64)
    for name in ("steps", "batch", "context", "width", "depth", "heads"):
        parser.add_argument(f"--{name}", type=int, default=getattr(default, name))
    parser.add_argument("--out", default="examples/runs/restore_on_new_mesh")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    cfg = Config(
        steps=args.steps,
        batch=args.batch,
        context=args.context,
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        warmup=max(1, args.steps // 10),
    )
    half = args.steps // 2
    tokens, _ = read_corpus()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    big = shardopt.zero(3, Mesh(jax.devices(), ("data",)))
    model, opt = build(cfg, big)
    reference: list[float] = []
    model, opt, _ = train(
        model, opt, range(half), tokens, cfg, big.mesh, reference, "8 devices, ZeRO-3"
    )
    print(f"saved at step {half}: moments {layout_of(opt)}")
    with (
        tempfile.TemporaryDirectory() as directory,
        shardopt.CheckpointManager(directory) as ckpt,
    ):
        ckpt.save(half, params=model, opt=opt)
        ckpt.wait()
        saved = host_arrays(model, opt)
        # the uninterrupted reference: the same run, carried on in place
        model, opt, _ = train(
            model,
            opt,
            range(half, cfg.steps),
            tokens,
            cfg,
            big.mesh,
            reference,
            "8 devices, ZeRO-3",
        )
        final = host_arrays(model)

        small = shardopt.zero(1, Mesh(jax.devices()[:4], ("data",)))
        like_model, like_opt = build(cfg, small, abstract=True)
        got = ckpt.restore(half, params=like_model, opt=like_opt)
    restored_equal = all(
        np.array_equal(a, b)
        for a, b in zip(saved, host_arrays(got.params, got.opt), strict=True)
    )
    print(
        f"restored step {got.step} on 4 devices at ZeRO-1: moments "
        f"{layout_of(got.opt)}; parameters and optimizer state equal to the saved "
        f"ones bit for bit: {restored_equal}"
    )

    continued = list(reference[:half])
    model, opt, _ = train(
        got.params,
        got.opt,
        range(half, cfg.steps),
        tokens,
        cfg,
        small.mesh,
        continued,
        "4 devices, ZeRO-1",
    )
    ref, new = np.array(reference[half:]), np.array(continued[half:])
    loss_diff = float(np.max(np.abs(new - ref) / np.abs(ref)))
    param_diff = max(
        float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) or 1.0))
        for a, b in zip(host_arrays(model), final, strict=True)
    )
    continued_equal = loss_diff <= RTOL and param_diff <= RTOL
    print(
        f"steps {half + 1}-{cfg.steps} on 4 devices at ZeRO-1 against the "
        f"uninterrupted run on 8 at ZeRO-3: loss {new[-1]:.6f} vs {ref[-1]:.6f}, "
        f"largest relative difference of a loss {loss_diff:.1e}, of the final "
        f"parameters {param_diff:.1e} (tolerance {RTOL:g}): equal to rounding: "
        f"{continued_equal}"
    )
    result = {
        "reference": reference,
        "continued": continued,
        "restored_equal": restored_equal,
        "loss_difference": loss_diff,
        "parameter_difference": param_diff,
        "continued_equal": continued_equal,
        "plots": [] if args.no_plots else plot(out, reference, continued, half),
    }
    if not (restored_equal and continued_equal):
        raise SystemExit(1)
    return result


def plot(
    out: pathlib.Path, reference: list[float], continued: list[float], half: int
) -> list[str]:
    """restore.png: both runs' losses and where the mesh changed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed, so no plots: pip install -e '.[examples]'")
        return []
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    steps = np.arange(1, len(reference) + 1)
    ax.plot(steps, reference, lw=2.5, color="tab:gray", alpha=0.5, label="8 devices")
    ax.plot(
        steps[half:],
        continued[half:],
        lw=0.9,
        color="tab:red",
        label="restored on 4 devices, ZeRO-1",
    )
    ax.axvline(half, ls=":", color="black", label="checkpoint (8 devices, ZeRO-3)")
    ax.set(xlabel="step", ylabel="loss (nats/char)", title="Restore on a new mesh")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    path = out / "restore.png"
    fig.savefig(path)
    plt.close(fig)
    print(f"plot: {path.resolve()}")
    return [str(path)]


if __name__ == "__main__":
    main()
