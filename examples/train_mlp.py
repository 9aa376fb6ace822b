"""Train an Equinox MLP with shardopt's AdamW and a warmup-cosine schedule.

Run with `scripts/demo` (8 simulated CPU devices). The batch is split over the
devices of a 1-D "data" mesh; parameters and optimizer state are replicated.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt

STEPS = 300


def target(x):
    return jnp.sin(3 * x[..., :1]) * jnp.cos(2 * x[..., 1:2])


def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


@eqx.filter_jit(donate="all-except-first")
def train_step(batch, model, opt):
    x, y = batch
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    model, opt = opt.step(model, grads)
    return model, opt, loss


def main() -> None:
    mesh = Mesh(jax.devices(), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    model = eqx.nn.MLP(2, 1, width_size=64, depth=3, key=jax.random.key(0))
    schedule = shardopt.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=3e-3, warmup_steps=30, decay_steps=STEPS
    )
    only_matrices = lambda m: jax.tree.map(lambda p: p.ndim == 2, m)
    opt = shardopt.Optimizer(
        shardopt.chain(
            shardopt.clip_by_global_norm(1.0),
            shardopt.adamw(schedule, weight_decay=1e-4, mask=only_matrices),
        ),
        model,
    )
    print(f"devices: {jax.device_count()} ({jax.devices()[0].platform})")
    print(f"{'step':>5} {'learning rate':>14} {'loss':>10}")
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
    print(f"optimizer steps taken: {int(opt.count)}")


if __name__ == "__main__":
    main()
