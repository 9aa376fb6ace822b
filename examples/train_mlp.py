"""Train an Equinox MLP with ZeRO-sharded AdamW, checkpoint it, restore it elsewhere.

Run with `python examples/train_mlp.py` (8 simulated CPU devices; `--stage 3`
for FSDP). The batch is split over a 1-D "data" mesh; the plan partitions the
optimizer state (stage 1), the gradients (stage 2) and the parameters (stage 3)
over the same axis. At the end the checkpoint is restored onto 4 devices at
stage 0 and checked to be equal.
"""

import argparse
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt

STEPS = 300


def target(x):
    return jnp.sin(3 * x[..., :1]) * jnp.cos(2 * x[..., 1:2])


def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def build_model():
    return eqx.nn.MLP(2, 1, width_size=64, depth=3, key=jax.random.key(0))


def make_optimizer(model, plan):
    schedule = shardopt.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=3e-3, warmup_steps=30, decay_steps=STEPS
    )
    only_matrices = lambda m: jax.tree.map(lambda p: p.ndim == 2, m)
    transform = shardopt.chain(
        shardopt.clip_by_global_norm(1.0),
        shardopt.adamw(schedule, weight_decay=1e-4, mask=only_matrices),
    )
    return shardopt.Optimizer(transform, model, plan=plan)


@eqx.filter_jit(donate="all-except-first")
def train_step(batch, model, opt):
    loss, grads = opt.plan.value_and_grad(loss_fn)(model, *batch)
    model, opt = opt.step(model, grads)
    return model, opt, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=1, choices=range(4))
    stage = parser.parse_args().stage

    mesh = Mesh(jax.devices(), ("data",))
    plan = shardopt.zero(stage, mesh, min_size=256)
    model = plan.shard_params(build_model())
    opt = make_optimizer(model, plan)
    report = plan.memory_report(model, opt)
    print(
        f"{jax.device_count()} {jax.devices()[0].platform} devices, ZeRO stage {stage}"
    )
    for role, per_device in report.totals().items():
        print(f"  {role:<7} {max(per_device):>8,} bytes per device")

    print(f"{'step':>5} {'learning rate':>14} {'loss':>10}")
    batch_sharding = NamedSharding(mesh, P("data"))
    key = jax.random.key(1)
    for step in range(STEPS):
        key, sub = jax.random.split(key)
        x = jax.random.uniform(sub, (256, 2), minval=-1, maxval=1)
        batch = jax.device_put((x, target(x)), batch_sharding)
        model, opt, loss = train_step(batch, model, opt)
        if step % 50 == 0 or step == STEPS - 1:
            # Read the schedule from the live optimizer: donation deleted the
            # arrays of the one passed in at construction.
            rate = opt.hyperparameters()["learning_rate"](opt.count - 1)
            print(f"{step:>5} {float(rate):>14.2e} {float(loss):>10.5f}")

    with tempfile.TemporaryDirectory() as directory:
        with shardopt.CheckpointManager(directory) as ckpt:
            ckpt.save(STEPS, params=model, opt=opt, metadata={"stage": stage})
            ckpt.wait()
            # Restore onto half the devices, without ZeRO: the targets say where.
            small = shardopt.zero(0, Mesh(jax.devices()[:4], ("data",)))
            like_model = small.abstract_params(eqx.filter_eval_shape(build_model))
            like_opt = make_optimizer(like_model, small)
            restored = ckpt.restore(params=like_model, opt=like_opt)
        same = jax.tree.map(
            lambda a, b: bool(np.array_equal(a, b)),
            eqx.filter(model, eqx.is_array),
            eqx.filter(restored.params, eqx.is_array),
        )
    devices = {
        d.id
        for x in jax.tree.leaves(eqx.filter(restored.params, eqx.is_array))
        for d in x.sharding.device_set
    }
    print(
        f"checkpoint of step {restored.step} restored onto {len(devices)} devices at "
        f"stage 0: parameters equal = {all(jax.tree.leaves(same))}, "
        f"optimizer count = {int(restored.opt.count)}"
    )


if __name__ == "__main__":
    main()
