"""The benchmark suite: shardopt against optax, side by side in one process.

For each device count (1: no plan, arrays on one device; 8: simulated CPU
devices, a ZeRO plan), each model (an MLP, a small transformer, and trees of
10, 100, 1,000 and 10,000 leaves of about 1M float32 parameters in all) and
each optimizer (sgd with momentum, adamw, lion, adafactor, muon against
optax.contrib.muon), it builds every side, then runs them interleaved (the
order reversing each round) and prints a markdown table per section, with
medians of ``--repeats`` rounds:

- step: one training step, gradient and update, jitted and donated, until
  its results are ready;
- update: the update alone on fixed gradients (shardopt: ``Optimizer.step``
  under :func:`shardopt.jit_step`; the column "eqx" gives the same under
  ``eqx.filter_jit``, as a ratio to optax);
- dispatch: the time an update call takes to return, before its results are
  ready (XLA:CPU runs the program asynchronously): the host-side cost of a
  call, in flattening, cache lookups and handing the buffers to XLA;
- trace + compile: the first call's time minus the median of later calls;
- state: optimizer-state bytes on the fullest device, from the live arrays.

The baselines: optax's ``jax.jit`` update with donation ("optax"), and on 8
devices also optax sharded by hand to the plan's layout ("optax sharded",
as in ``bench_zero.py``: in/out shardings, moments placed with
``optax.tree_map_params``); "optax" there is replicated (data parallel, no
ZeRO). Ratios are shardopt / baseline.

    PYTHONPATH=. python scripts/bench.py [--optimizers adamw,muon] [--models mlp]
        [--devices 1,8] [--repeats 20] [--max-leaves 1000] [--quick]
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import math
import statistics
import time
import traceback

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_common import Transformer, cpu_model, nbytes_per_device, optax_shardings
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt

LR, WD = 1e-3, 1e-4
TOTAL = 2**20  # parameters of the leaf-count trees

OPTIMIZERS = {
    "sgd": (
        lambda: shardopt.sgd(LR, momentum=0.9),
        lambda: optax.sgd(LR, momentum=0.9),
    ),
    "adamw": (
        lambda: shardopt.adamw(LR, weight_decay=WD),
        lambda: optax.adamw(LR, weight_decay=WD),
    ),
    "lion": (
        lambda: shardopt.lion(LR / 10, weight_decay=WD),
        lambda: optax.lion(LR / 10, weight_decay=WD),
    ),
    "adafactor": (lambda: shardopt.adafactor(LR), lambda: optax.adafactor(LR)),
    "muon": (lambda: shardopt.muon(LR), lambda: optax.contrib.muon(LR)),
}


# ------------------------------------------------------------------ models
def mlp_case():
    """An MLP of 1.05M parameters (10 leaves), batch 32."""
    model = eqx.nn.MLP(256, 256, 512, 4, key=jax.random.key(0))

    def loss(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    kx, ky = jax.random.split(jax.random.key(1))
    return (
        model,
        loss,
        (jax.random.normal(kx, (32, 256)), jax.random.normal(ky, (32, 256))),
    )


def transformer_case():
    """A 4-layer decoder of 0.93M parameters (54 leaves), 16 sequences of 32."""
    seq = 32
    model = Transformer(512, 128, 4, 4, seq, jax.random.key(0))

    def loss(model, tokens):
        logits = jax.vmap(model)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return model, loss, (jax.random.randint(jax.random.key(1), (16, seq + 1), 0, 512),)


def leaves_shape(count):
    """A matrix shape of about TOTAL / count elements, rows a multiple of 8."""
    size = TOTAL / count
    rows = max(8, 8 * round(math.sqrt(size) / 8))
    return rows, max(1, round(size / rows))


def leaves_case(count):
    """``count`` matrices of the same shape, about TOTAL parameters in all."""
    shape = leaves_shape(count)
    keys = jax.random.split(jax.random.key(0), count)
    params = {
        f"w{i:05d}": 0.1 * jax.random.normal(k, shape) for i, k in enumerate(keys)
    }

    def loss(params, x):
        return jnp.mean(x) * sum(jnp.sum(p * p) for p in jax.tree.leaves(params))

    return params, loss, (jnp.arange(8, dtype=jnp.float32),)


MODELS = {
    "mlp": mlp_case,
    "transformer": transformer_case,
    **{f"leaves{n}": (lambda n=n: leaves_case(n)) for n in (10, 100, 1000, 10000)},
}


def leaf_count(name):
    if name.startswith("leaves"):
        return int(name[len("leaves") :])
    return len(jax.tree.leaves(eqx.filter(MODELS[name]()[0], eqx.is_inexact_array)))


# ------------------------------------------------------------------ sides
def fresh(tree):
    """A copy sharing no buffer with ``tree`` (every side donates its own)."""
    return jax.tree.map(
        lambda x: jnp.array(np.asarray(x)) if isinstance(x, jax.Array) else x, tree
    )


class Side:
    """One way of training: a jitted step and update on its own buffers."""

    def __init__(self, step, update, params, state, grads, batch):
        self.step, self.update = step, update
        self.params, self.state, self.grads, self.batch = params, state, grads, batch
        self.times = {"step": [], "update": [], "dispatch": []}
        self.first = {}

    def run_step(self):
        t0 = time.perf_counter()
        out = self.step(self.params, self.state, self.batch)
        self.params, self.state = jax.block_until_ready(out)
        return time.perf_counter() - t0

    def run_update(self):
        jax.block_until_ready((self.params, self.state))
        t0 = time.perf_counter()
        out = self.update(self.params, self.state, self.grads)
        t1 = time.perf_counter()
        self.params, self.state = jax.block_until_ready(out)
        return time.perf_counter() - t0, t1 - t0

    def warm_up(self):
        if self.step is not None:
            self.first["step"] = self.run_step()
            self.run_step()
        self.first["update"] = self.run_update()[0]
        self.run_update()

    def measure(self):
        if self.step is not None:
            self.times["step"].append(self.run_step())
        total, dispatch = self.run_update()
        self.times["update"].append(total)
        self.times["dispatch"].append(dispatch)

    def median(self, what):
        return statistics.median(self.times[what]) if self.times[what] else None

    def compile_time(self, what):
        if what not in self.first:
            return None
        return max(0.0, self.first[what] - self.median(what))


def shardopt_sides(make_tx, model, loss, batch, plan):
    """shardopt through its public API: ``Optimizer.step`` under jit_step
    (step and update) and under ``eqx.filter_jit`` (update only)."""
    params = fresh(model) if plan is None else plan.shard_params(fresh(model))
    opt = shardopt.Optimizer(make_tx(), params, plan=plan)
    grad_fn = (
        eqx.filter_value_and_grad(loss)
        if plan is None
        else opt.plan.value_and_grad(loss)
    )
    grads = eqx.filter_jit(lambda p, b: grad_fn(p, *b)[1])(params, batch)

    def step(params, opt, batch):
        _, grads = grad_fn(params, *batch)
        return opt.step(params, grads)

    def update(params, opt, grads):
        return opt.step(params, grads)

    main = Side(
        shardopt.jit_step(step, donate_argnums=(0, 1)),
        shardopt.jit_step(update, donate_argnums=(0, 1)),
        params,
        opt,
        grads,
        batch,
    )
    # eqx.filter_jit donates all but the first argument: gradients go first
    eqx_update = eqx.filter_jit(lambda g, p, o: o.step(p, g), donate="all-except-first")
    params2 = fresh(params) if plan is None else plan.shard_params(fresh(params))
    opt2 = shardopt.Optimizer(make_tx(), params2, plan=plan)
    via_eqx = Side(
        None, lambda p, o, g: eqx_update(g, p, o), params2, opt2, grads, batch
    )
    return main, via_eqx


def optax_side(make_tx, model, loss, batch, plan, mesh):
    """optax: ``jax.jit`` with donation; with a plan, sharded by hand to its
    layout; with a mesh and no plan, replicated."""
    arrays, static = eqx.partition(fresh(model), eqx.is_inexact_array)
    tx = make_tx()

    def full_loss(params, *batch):
        if plan is not None and plan.stage >= 3:  # gather before use
            rep = NamedSharding(mesh, P())
            params = jax.lax.with_sharding_constraint(
                params, jax.tree.map(lambda _: rep, params)
            )
        return loss(eqx.combine(params, static), *batch)

    def apply(params, state, grads):
        updates, state = tx.update(grads, state, params)
        if plan is not None:
            updates = jax.lax.with_sharding_constraint(updates, param_sh)
        return optax.apply_updates(params, updates), state

    def step(params, state, batch):
        grads = jax.grad(full_loss)(params, *batch)
        if plan is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_sh)
        return apply(params, state, grads)

    if plan is None:
        if mesh is not None:
            arrays = jax.device_put(arrays, NamedSharding(mesh, P()))
        state = jax.jit(tx.init)(arrays)
        step_fn = jax.jit(step, donate_argnums=(0, 1))
        update_fn = jax.jit(apply, donate_argnums=(0, 1))
    else:
        param_sh, grad_sh, state_sh = optax_shardings(plan, arrays, tx)
        arrays = jax.device_put(arrays, param_sh)
        state = jax.jit(tx.init, out_shardings=state_sh)(arrays)
        shardings = dict(out_shardings=(param_sh, state_sh), donate_argnums=(0, 1))
        step_fn = jax.jit(step, in_shardings=(param_sh, state_sh, None), **shardings)
        update_fn = jax.jit(
            apply, in_shardings=(param_sh, state_sh, grad_sh), **shardings
        )
    grads = jax.jit(jax.grad(full_loss))(arrays, *batch)
    if plan is not None:
        grads = jax.device_put(grads, grad_sh)
    return Side(step_fn, update_fn, arrays, state, grads, batch)


# ------------------------------------------------------------------ one section
def run_section(devices, model_name, optimizers, repeats, stage, min_size):
    model, loss, batch = MODELS[model_name]()
    mesh = plan = None
    if devices > 1:
        mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
        plan = shardopt.zero(stage, mesh, min_size=min_size)
        batch = tuple(jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batch)
    rows = []
    for name in optimizers:
        make_s, make_o = OPTIMIZERS[name]
        sides, failed = {}, {}
        builders = {
            "shardopt": lambda make=make_s: shardopt_sides(
                make, model, loss, batch, plan
            ),
            "optax": lambda make=make_o: optax_side(
                make, model, loss, batch, None, mesh
            ),
        }
        if plan is not None:
            builders["optax sharded"] = lambda make=make_o: optax_side(
                make, model, loss, batch, plan, mesh
            )
        for key, build in builders.items():
            try:
                built = build()
                if key == "shardopt":
                    sides["shardopt"], sides["eqx"] = built
                else:
                    sides[key] = built
                for k in ("shardopt", "eqx") if key == "shardopt" else (key,):
                    sides[k].warm_up()
            except Exception as err:
                failed[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                traceback.print_exc()
                sides.pop(key, None)
                if key == "shardopt":
                    sides.pop("eqx", None)
        for r in range(repeats):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for key in order:
                sides[key].measure()
        if "shardopt" not in sides:
            rows.append((name, "-", None, None, None, failed))
            continue
        state_of = lambda side, key: (
            (side.state.state, side.state.count)
            if key in ("shardopt", "eqx")
            else side.state
        )
        state_bytes = {
            key: nbytes_per_device(state_of(side, key), mesh)
            if mesh is not None
            else _bytes(state_of(side, key))
            for key, side in sides.items()
        }
        for base in [k for k in ("optax", "optax sharded") if k in builders]:
            rows.append(
                (
                    name,
                    base,
                    sides.get("shardopt"),
                    sides.get("eqx"),
                    sides.get(base),
                    failed,
                    state_bytes,
                )
            )
        print(f"    {model_name} on {devices}: {name} done", flush=True)
    return rows


def _bytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


# ------------------------------------------------------------------ output
def cell(ours, theirs, scale, digits):
    if ours is None or theirs is None:
        return "-", "-"
    ratio = f"{ours / theirs:.2f}" if theirs > 0 else "-"
    return f"{scale * ours:.{digits}f} / {scale * theirs:.{digits}f}", ratio


def print_table(rows):
    print(
        "| optimizer | vs | step (ms) | ratio | update (ms) | ratio | eqx.filter_jit "
        "update ratio | dispatch (us) | ratio | trace+compile step (s) | ratio | "
        "trace+compile update (s) | ratio | state / device (KiB) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        name, base, ours, via_eqx, theirs, failed = row[:6]
        if ours is None or theirs is None:
            why = "; ".join(f"{k} failed: {v}" for k, v in failed.items())
            print(f"| {name} | {base} | {why} |" + " |" * 13)
            continue
        state_bytes = row[6]
        cells = [
            cell(ours.median("step"), theirs.median("step"), 1e3, 2),
            cell(ours.median("update"), theirs.median("update"), 1e3, 2),
        ]
        eqx_ratio = (
            f"{via_eqx.median('update') / theirs.median('update'):.2f}"
            if via_eqx is not None
            else "-"
        )
        rest = [
            cell(ours.median("dispatch"), theirs.median("dispatch"), 1e6, 0),
            cell(ours.compile_time("step"), theirs.compile_time("step"), 1, 2),
            cell(ours.compile_time("update"), theirs.compile_time("update"), 1, 2),
            cell(state_bytes["shardopt"], state_bytes[base], 1 / 1024, 1),
        ]
        flat = [x for pair in cells for x in pair] + [eqx_ratio]
        flat += [x for pair in rest for x in pair]
        print(f"| {name} | {base} | " + " | ".join(flat) + " |", flush=True)


def machine():
    model = cpu_model()
    return (
        f"{model}, {os.cpu_count()} cores, {jax.device_count()} "
        f"{jax.devices()[0].platform} devices; jax {jax.__version__}, equinox "
        f"{eqx.__version__}, optax {optax.__version__}; load average "
        f"{os.getloadavg()[0]:.1f}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--devices", default="1,8")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (20)")
    parser.add_argument(
        "--max-leaves",
        type=int,
        default=1000,
        help="skip models with more leaves (XLA compiled one 10,000-leaf update "
        "in about 7 minutes here)",
    )
    parser.add_argument("--stage", type=int, default=1, help="ZeRO stage on 8 devices")
    parser.add_argument(
        "--min-size", type=int, default=64, help="plan min_size (smaller: replicated)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="5 rounds, at most 100 leaves"
    )
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 20)
    max_leaves = min(args.max_leaves, 100) if args.quick else args.max_leaves
    optimizers = args.optimizers.split(",")
    for name in optimizers:
        if name not in OPTIMIZERS:
            parser.error(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    models = args.models.split(",")
    for name in models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    skipped = [m for m in models if leaf_count(m) > max_leaves]
    print(f"machine: {machine()}")
    print(
        f"{repeats} interleaved rounds, medians; on 8 devices shardopt.zero("
        f"{args.stage}, mesh, min_size={args.min_size}); cells are shardopt / "
        "baseline, ratios shardopt / baseline"
    )
    if skipped:
        print(
            f"skipped: {', '.join(skipped)} (more than --max-leaves "
            f"{max_leaves} leaves)"
        )
    started = time.perf_counter()
    for devices in (int(d) for d in args.devices.split(",")):
        for model_name in models:
            if model_name in skipped:
                continue
            t0 = time.perf_counter()
            rows = run_section(
                devices, model_name, optimizers, repeats, args.stage, args.min_size
            )
            print()
            print(
                f"### {model_name} ({leaf_count(model_name)} leaves), {devices} "
                f"device{'s' if devices > 1 else ''} ({time.perf_counter() - t0:.0f} s)"
            )
            print()
            print_table(rows)
            print(flush=True)
    print(
        f"total {time.perf_counter() - started:.0f} s; load average at the end "
        f"{os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
