"""A character-level GPT in Equinox, trained on the Python standard library's source.

    python examples/equinox_gpt.py [--stage 0-3] [--steps N] [--state-bits 8]
                                   [--out DIR] [--resume]

The text needs no download: a fixed list of the standard library's own modules
(``argparse.py``, ``functools.py``, ...) is read at run time. The model is a
small GPT (token and position embeddings, pre-norm causal self-attention
blocks, a linear head); the optimizer is AdamW with warmup-cosine learning
rates and global-norm clipping, sharded by ``shardopt.zero(stage, mesh)`` over
a 1-D "data" mesh of 8 simulated CPU devices, with the batch split over it.
``--state-bits 8`` keeps AdamW's moments in 8 bits (``adamw(..., state_bits=8)``).

Every ``--ckpt-every`` steps (and at the end) the parameters, the optimizer and
the loss history are saved with ``shardopt.CheckpointManager``. ``--resume``
continues from the latest step exactly: the batch of a step is a function of
the step alone, so the losses after a resume equal those of an uninterrupted
run bit for bit (at the same stage). ``--stop-after N`` stops early, as an
interruption would. At the end the script prints a sample of generated text
and writes two plots (matplotlib, the ``examples`` extra): the loss curve and
the bytes of parameters, gradients and optimizer state per device at each ZeRO
stage, read from the plan's memory report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt

# The corpus: modules present as single files in every CPython from 3.10 on.
MODULES = """
    argparse.py bisect.py calendar.py configparser.py contextlib.py copy.py csv.py
    dataclasses.py difflib.py enum.py fractions.py functools.py heapq.py inspect.py
    operator.py pprint.py queue.py random.py shlex.py statistics.py string.py
    textwrap.py tokenize.py typing.py uuid.py weakref.py
""".split()  # noqa: SIM905 (a list of 26 names, one a line, is harder to read)
# A fixed vocabulary: newline and printable ASCII; anything else reads as "?".
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
SEED = 0


@dataclasses.dataclass(frozen=True)
class Config:
    """What a run is: a checkpoint can only be resumed by the same config."""

    steps: int = 1000
    batch: int = 32  # sequences per step, split over the data axis
    context: int = 64
    width: int = 128
    depth: int = 2
    heads: int = 4
    lr: float = 3e-3
    warmup: int = 100
    state_bits: int | None = None  # 8: AdamW's moments in 8 bits; None: float32


# ----------------------------------------------------------------------- data
def read_corpus() -> tuple[np.ndarray, list[str]]:
    """The standard library modules in MODULES as token ids (uint8), and their paths."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    found = [root / name for name in MODULES if (root / name).is_file()]
    if len(found) < len(MODULES) // 2:
        raise SystemExit(
            f"found only {len(found)} of the {len(MODULES)} standard-library "
            f"modules under {root}; this Python ships without its sources"
        )
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in found)
    text = text.replace("\t", "    ")
    lookup = np.full(128, VOCAB.index("?"), np.uint8)
    for i, c in enumerate(VOCAB):
        lookup[ord(c)] = i
    codes = np.frombuffer(text.encode("ascii", "replace"), np.uint8)
    return lookup[np.minimum(codes, 127)], [str(p) for p in found]


def batch_at(step: int, tokens: np.ndarray, cfg: Config) -> tuple[np.ndarray, ...]:
    """Inputs and next-token targets of ``step``: a function of the step alone,
    so a resumed run reads exactly the batches the uninterrupted one would."""
    rng = np.random.default_rng((SEED, step))
    starts = rng.integers(0, len(tokens) - cfg.context - 1, size=cfg.batch)
    window = tokens[starts[:, None] + np.arange(cfg.context + 1)].astype(np.int32)
    return window[:, :-1], window[:, 1:]


def decode(ids: Iterable[int]) -> str:
    """Token ids back to text."""
    return "".join(VOCAB[int(i)] for i in ids)


# ---------------------------------------------------------------------- model
class Block(eqx.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    norm1: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, width: int, heads: int, key: jax.Array):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = eqx.nn.LayerNorm(width)
        # no bias: a key bias has zero gradient (softmax ignores a shift shared
        # by a query's scores), so Adam would only amplify rounding noise in it
        self.qkv = eqx.nn.Linear(width, 3 * width, use_bias=False, key=k1)
        self.proj = eqx.nn.Linear(width, width, key=k2)
        self.norm2 = eqx.nn.LayerNorm(width)
        self.up = eqx.nn.Linear(width, 4 * width, key=k3)
        self.down = eqx.nn.Linear(4 * width, width, key=k4)
        self.heads = heads

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (time, width)
        t, w = x.shape
        qkv = jax.vmap(self.qkv)(jax.vmap(self.norm1)(x))
        q, k, v = (
            a.reshape(t, self.heads, w // self.heads) for a in jnp.split(qkv, 3, -1)
        )
        att = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(t, w)
        x = x + jax.vmap(self.proj)(att)
        h = jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.norm2)(x)))
        return x + jax.vmap(self.down)(h)


class GPT(eqx.Module):
    """Token ids (time,) -> next-token logits (time, vocab)."""

    embed: eqx.nn.Embedding
    position: jax.Array
    blocks: tuple[Block, ...]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, cfg: Config, key: jax.Array):
        keys = jax.random.split(key, cfg.depth + 3)
        self.embed = eqx.nn.Embedding(len(VOCAB), cfg.width, key=keys[0])
        self.position = 0.02 * jax.random.normal(keys[1], (cfg.context, cfg.width))
        self.blocks = tuple(Block(cfg.width, cfg.heads, k) for k in keys[3:])
        self.norm = eqx.nn.LayerNorm(cfg.width)
        self.head = eqx.nn.Linear(cfg.width, len(VOCAB), use_bias=False, key=keys[2])

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jax.vmap(self.embed)(ids) + self.position[: ids.shape[0]]
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(jax.vmap(self.norm)(x))


def loss_fn(model: GPT, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean next-character cross-entropy (nats) of a batch of sequences."""
    logp = jax.nn.log_softmax(jax.vmap(model)(x), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))


def matrices(params: GPT) -> GPT:
    """Which leaves get weight decay: the matrices (not biases or norm scales).

    A module-level function: the mask is a static leaf of the optimizer, and a
    new lambda per optimizer would make every jitted step compile anew."""
    return jax.tree.map(lambda p: p.ndim == 2, params)


def make_transform(cfg: Config) -> shardopt.AbstractTransform:
    """AdamW (decay on matrices only), warmup-cosine rates, global-norm clipping."""
    schedule = shardopt.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup,
        decay_steps=cfg.steps,
        end_value=cfg.lr / 10,
    )
    return shardopt.chain(
        shardopt.clip_by_global_norm(1.0),
        shardopt.adamw(
            schedule,
            b1=0.9,
            b2=0.95,
            weight_decay=0.1,
            mask=matrices,
            state_bits=cfg.state_bits,
        ),
    )


@eqx.filter_jit(donate="all-except-first")
def train_step(
    batch: tuple[jax.Array, jax.Array], model: GPT, opt: shardopt.Optimizer
) -> tuple[GPT, shardopt.Optimizer, jax.Array]:
    """One step: per-shard loss and gradients with the plan's collectives
    (``opt.plan.value_and_grad``), then the update; model and optimizer donated."""
    loss, grads = opt.plan.value_and_grad(loss_fn)(model, *batch)
    model, opt = opt.step(model, grads)
    return model, opt, loss


@eqx.filter_jit
def sample(model: GPT, prompt: jax.Array, key: jax.Array, length: int) -> jax.Array:
    """``length`` characters after ``prompt`` (at temperature 0.8), one at a time;
    the window slides once the context is full."""
    context = model.position.shape[0]
    buf = jnp.zeros(context, jnp.int32).at[: prompt.shape[0]].set(prompt)

    def one(carry, key):
        buf, n = carry
        logits = model(buf)[n - 1]
        token = jax.random.categorical(key, logits / 0.8).astype(jnp.int32)
        full = n == context
        buf = jnp.where(full, jnp.roll(buf, -1), buf)
        buf = buf.at[jnp.where(full, context - 1, n)].set(token)
        return (buf, jnp.minimum(n + 1, context)), token

    start = (buf, jnp.asarray(prompt.shape[0], jnp.int32))
    return jax.lax.scan(one, start, jax.random.split(key, length))[1]


# ---------------------------------------------------------------- training
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", type=int, default=1, choices=range(4), help="ZeRO stage")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--context", type=int, default=d.context)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=None, help="default: steps // 10")
    p.add_argument(
        "--state-bits",
        type=int,
        default=None,
        choices=(8,),
        help="8: AdamW's moments in 8 bits (default: float32)",
    )
    p.add_argument("--ckpt-every", type=int, default=250, metavar="N")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after step N, as an interruption would",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in --out",
    )
    p.add_argument("--sample", type=int, default=300, help="characters to generate")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--out",
        default="examples/runs/equinox_gpt",
        help="checkpoints, metrics.json and plots go here",
    )
    return p.parse_args(argv)


def config_of(args: argparse.Namespace) -> Config:
    """The run configuration from the options (checked, naming the option)."""
    if args.width % args.heads:
        raise SystemExit(
            f"--width {args.width} is not divisible by --heads {args.heads}"
        )
    if args.context < 8 or args.steps < 1:
        raise SystemExit("--context must be at least 8 and --steps at least 1")
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    return Config(
        args.steps,
        args.batch,
        args.context,
        args.width,
        args.depth,
        args.heads,
        args.lr,
        warmup,
        args.state_bits,
    )


def build(
    cfg: Config, plan: shardopt.ShardingPlan, abstract: bool = False
) -> tuple[GPT, shardopt.Optimizer]:
    """The model and its optimizer in the plan's layout; as ShapeDtypeStructs
    (restore targets) when ``abstract``."""
    make = lambda: GPT(cfg, jax.random.key(SEED))
    if abstract:
        model = plan.abstract_params(eqx.filter_eval_shape(make))
    else:
        model = plan.shard_params(make())
    return model, shardopt.Optimizer(make_transform(cfg), model, plan=plan)


def restore(
    ckpt: shardopt.CheckpointManager, cfg: Config, plan: shardopt.ShardingPlan
) -> tuple[GPT, shardopt.Optimizer, int, list[float]]:
    """The latest checkpoint: model, optimizer, step, loss history."""
    step = ckpt.latest_step()
    if step is None:
        raise SystemExit(f"--resume: no checkpoint in {ckpt.directory}")
    saved = ckpt.metadata(step)["metadata"]
    if "config" not in saved:
        raise SystemExit(
            f"--resume: step {step} in {ckpt.directory} was not saved by this "
            "example (its metadata has no run configuration)"
        )
    now = dataclasses.asdict(cfg)
    differ = [
        f"{k}: saved {saved['config'].get(k)!r}, now {v!r}"
        for k, v in now.items()
        if saved["config"].get(k) != v
    ]
    if differ:
        raise SystemExit(
            f"--resume: step {step} in {ckpt.directory} was saved by another run "
            f"configuration ({'; '.join(differ)}); pass the same options, or "
            "start over without --resume"
        )
    if saved["stage"] != plan.stage:
        print(
            f"step {step} was saved at ZeRO stage {saved['stage']}; continuing "
            f"at stage {plan.stage} (equal to rounding, not bit for bit)"
        )
    model, opt = build(cfg, plan, abstract=True)
    got = ckpt.restore(step, params=model, opt=opt)
    return got.params, got.opt, step, list(got.data["losses"])


def progress_bar(total: int, done: int, label: str = "training") -> tuple:
    """A rich progress bar (step, loss, tokens per second, elapsed, ETA) when
    stdout is a terminal; otherwise disabled, and the caller prints lines."""
    from rich import progress as rp

    bar = rp.Progress(
        rp.TextColumn("[bold]{task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TextColumn("loss {task.fields[loss]:.3f}"),
        rp.TextColumn("{task.fields[speed]:>7,.0f} tok/s"),
        rp.TimeElapsedColumn(),
        rp.TextColumn("eta"),
        rp.TimeRemainingColumn(),
        disable=not sys.stdout.isatty(),
    )
    task = bar.add_task(label, total=total, completed=done, loss=math.nan, speed=0)
    return bar, task


def train(
    model: GPT,
    opt: shardopt.Optimizer,
    steps: range,
    tokens: np.ndarray,
    cfg: Config,
    mesh: Mesh,
    losses: list[float],
    label: str = "training",
    after_step: Callable[[int, GPT, shardopt.Optimizer], None] | None = None,
) -> tuple[GPT, shardopt.Optimizer, float]:
    """Run ``steps`` (appending to ``losses``) under a progress bar; call
    ``after_step(step_done, model, opt)`` after each. Returns the model, the
    optimizer and the tokens per second after the first (compiling) step."""
    data = NamedSharding(mesh, P("data"))
    bar, task = progress_bar(cfg.steps, steps.start, label)
    every = max(1, len(steps) // 10)
    timed_from, timed, speed = None, 0, 0.0
    with bar:
        for step in steps:
            batch = jax.device_put(batch_at(step, tokens, cfg), data)
            model, opt, loss = train_step(batch, model, opt)
            losses.append(float(loss))
            now = time.perf_counter()
            if timed_from is None:  # the first step compiles: time the rest
                timed_from = now
            else:
                timed += 1
                speed = timed * cfg.batch * cfg.context / (now - timed_from)
            bar.update(task, advance=1, loss=losses[-1], speed=speed)
            done = step + 1
            if bar.disable and (done % every == 0 or done == steps.stop):
                print(
                    f"{label}: step {done:>5}/{cfg.steps}  loss {losses[-1]:.4f}  "
                    f"{speed:,.0f} tok/s"
                )
            if after_step is not None:
                after_step(done, model, opt)
    return model, opt, speed


def run(args: argparse.Namespace, ckpt: shardopt.CheckpointManager) -> dict:
    """Build or restore, train to the end (or ``--stop-after``) saving every
    ``--ckpt-every`` steps and at the last; the losses and timings."""
    cfg = config_of(args)
    tokens, files = read_corpus()
    mesh = Mesh(jax.devices(), ("data",))
    plan = shardopt.zero(args.stage, mesh)
    print(
        f"{len(tokens):,} characters from {len(files)} standard-library modules, "
        f"vocabulary {len(VOCAB)} (uniform guess: loss ln {len(VOCAB)} = "
        f"{math.log(len(VOCAB)):.3f})"
    )
    if args.resume:
        model, opt, start, losses = restore(ckpt, cfg, plan)
        print(f"resumed from step {start} ({ckpt.directory})")
    else:
        model, opt = build(cfg, plan)
        start, losses = 0, []
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    state = plan.memory_report(model, opt).totals()["state"]
    print(
        f"GPT: {n_params:,} parameters, {cfg.depth} blocks of width {cfg.width}; "
        f"{jax.device_count()} devices, ZeRO stage {plan.stage}, optimizer state "
        f"{max(state):,} bytes per device"
    )
    stop = min(cfg.steps, args.stop_after or cfg.steps)

    def save(step: int, model: GPT, opt: shardopt.Optimizer) -> None:
        if step % args.ckpt_every == 0 or step == stop:
            ckpt.save(
                step,
                params=model,
                opt=opt,
                data={"losses": losses},
                metadata={"config": dataclasses.asdict(cfg), "stage": plan.stage},
            )

    began = time.perf_counter()
    steps = range(start, stop)
    model, opt, speed = train(
        model, opt, steps, tokens, cfg, mesh, losses, after_step=save
    )
    seconds = time.perf_counter() - began
    print(
        f"steps {start + 1}-{stop} in {seconds:.1f} s; loss {losses[0]:.3f} at "
        f"step 1, {losses[-1]:.3f} at step {stop}; checkpoint of step {stop} "
        f"in {ckpt.directory}"
    )
    text = ""
    if args.sample:
        prompt = "def "
        ids = jnp.asarray([VOCAB.index(c) for c in prompt], jnp.int32)
        text = prompt + decode(sample(model, ids, jax.random.key(SEED), args.sample))
        print(f"--- sample ---\n{text}\n--------------")
    result = {
        "config": dataclasses.asdict(cfg),
        "stage": plan.stage,
        "first_step": start + 1,
        "losses": losses,
        "seconds": seconds,
        "tokens_per_second": speed,
        "sample": text,
        "plots": [],
    }
    if not args.no_plots:
        result["plots"] = plots(pathlib.Path(args.out), cfg, mesh, losses, start)
    return result


def main(argv: list[str] | None = None) -> dict:
    """Train (or resume), sample, plot; returns what ``metrics.json`` holds."""
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    ckpt_dir = out / "checkpoints"
    if not args.resume and ckpt_dir.exists():
        print(f"starting over: removing the checkpoints in {ckpt_dir}")
        shutil.rmtree(ckpt_dir)
    out.mkdir(parents=True, exist_ok=True)
    with shardopt.CheckpointManager(ckpt_dir, max_to_keep=2) as ckpt:
        result = run(args, ckpt)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------- plots
def memory_by_stage(cfg: Config, mesh: Mesh) -> dict[int, dict[str, int]]:
    """Bytes per device (the largest) by role, at each ZeRO stage, from shapes."""
    abstract = eqx.filter_eval_shape(GPT, cfg, jax.random.key(SEED))
    out = {}
    for stage in range(4):
        report = shardopt.zero(stage, mesh).memory_report(abstract, make_transform(cfg))
        out[stage] = {role: max(v) for role, v in report.totals().items()}
    return out


def plots(
    out: pathlib.Path, cfg: Config, mesh: Mesh, losses: list[float], resumed_at: int
) -> list[str]:
    """loss.png and memory.png under ``out``; without matplotlib, a message."""
    memory = memory_by_stage(cfg, mesh)
    for stage, roles in memory.items():
        print(
            f"ZeRO stage {stage}: "
            + ", ".join(f"{role} {n / 1024:,.0f} KiB" for role, n in roles.items())
            + " per device"
        )
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed, so no plots: pip install -e '.[examples]'")
        return []
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, color="tab:blue", alpha=0.35, label="loss")
    k = max(1, len(losses) // 30)
    if len(losses) > k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color="tab:blue", label=f"mean of {k} steps")
    ax.axhline(
        math.log(len(VOCAB)),
        ls="--",
        color="gray",
        label=f"uniform guess (ln {len(VOCAB)})",
    )
    if resumed_at:
        ax.axvline(resumed_at, ls=":", color="tab:red", label="resumed")
    ax.set(
        xlabel="step",
        ylabel="cross-entropy (nats/char)",
        title="Character GPT on the Python standard library",
    )
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    paths = [out / "loss.png", out / "memory.png"]
    fig.savefig(paths[0])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    roles = ("params", "grads", "state")
    names = {"params": "parameters", "grads": "gradients", "state": "optimizer state"}
    for i, role in enumerate(roles):
        values = [memory[s][role] / 1024 for s in range(4)]
        ax.bar(np.arange(4) + (i - 1) * 0.27, values, 0.27, label=names[role])
    ax.set_xticks(range(4), [f"ZeRO-{s}" for s in range(4)])
    ax.set(
        ylabel="KiB per device",
        title=f"Memory per device on {mesh.size} devices (plan's memory report)",
    )
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1])
    plt.close(fig)
    print(f"plots: {paths[0].resolve()} {paths[1].resolve()}")
    return [str(p) for p in paths]


if __name__ == "__main__":
    main()
