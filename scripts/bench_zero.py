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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt import sharding as sh

MiB = 2**20
LR, WD = 1e-3, 1e-4
KINDS = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS"}


# ------------------------------------------------------------------ models
class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    ln2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, dim, heads, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.ln1 = eqx.nn.LayerNorm(dim)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=k1)
        self.proj = eqx.nn.Linear(dim, dim, key=k2)
        self.ln2 = eqx.nn.LayerNorm(dim)
        self.up = eqx.nn.Linear(dim, 4 * dim, key=k3)
        self.down = eqx.nn.Linear(4 * dim, dim, key=k4)
        self.heads = heads

    def __call__(self, x):  # x: (T, dim)
        t, d = x.shape
        q, k, v = jnp.split(jax.vmap(self.qkv)(jax.vmap(self.ln1)(x)), 3, axis=-1)
        q, k, v = (a.reshape(t, self.heads, d // self.heads) for a in (q, k, v))
        scores = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(d // self.heads)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        att = jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, axis=-1), v)
        x = x + jax.vmap(self.proj)(att.reshape(t, d))
        h = jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.ln2)(x)))
        return x + jax.vmap(self.down)(h)


class Transformer(eqx.Module):
    embed: eqx.nn.Embedding
    pos: jax.Array
    blocks: tuple
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, vocab, dim, heads, layers, seq, key):
        keys = jax.random.split(key, layers + 3)
        self.embed = eqx.nn.Embedding(vocab, dim, key=keys[0])
        self.pos = 0.02 * jax.random.normal(keys[1], (seq, dim))
        self.blocks = tuple(Block(dim, heads, k) for k in keys[3:])
        self.ln_f = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, vocab, key=keys[2])

    def __call__(self, tokens):  # (T,) int32 -> (T, vocab) logits
        x = jax.vmap(self.embed)(tokens) + self.pos[: tokens.shape[0]]
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(jax.vmap(self.ln_f)(x))


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
    mesh = plan.mesh
    rep = NamedSharding(mesh, P())
    stage = plan.stage
    layout = plan.layout(arrays)

    def sharding_tree(partitioned):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: NamedSharding(
                mesh,
                layout[jax.tree_util.keystr(p)].partitioned
                if partitioned
                else layout[jax.tree_util.keystr(p)].base,
            ),
            arrays,
        )

    param_sh = sharding_tree(stage >= 3)
    grad_sh = sharding_tree(stage >= 2)
    moment_sh = sharding_tree(stage >= 1)
    tx = optax.adamw(LR, weight_decay=WD)
    abstract = jax.eval_shape(tx.init, arrays)
    state_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract,
        moment_sh,
        transform_non_params=lambda _: rep,
    )
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


# ------------------------------------------------------------------ helpers
def nbytes_per_device(tree, mesh):
    per = {d.id: 0 for d in mesh.devices.flat}
    for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        for shard in leaf.addressable_shards:
            per[shard.device.id] += shard.data.nbytes
    return max(per.values())


def total_bytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def compile_and_count(fn, *args):
    """The compiled step (run it, not ``fn``: one compile) and its collectives."""
    compiled = fn.lower(*args).compile()
    text = getattr(compiled, "compiled", compiled).as_text()
    counts = sh.count_collectives(text)
    parts = [f"{KINDS.get(k, k)} {n}" for k, n in sorted(counts.items()) if n]
    return compiled, ", ".join(parts) or "none"


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
