"""Train with ZeRO-3 across 2 local processes x 4 CPU devices, checkpoint, restore.

    python examples/multihost.py [CHECKPOINT_DIR]

``train`` is what every process of a multi-host job runs: the same calls in
the same order on every process. Here shardopt.launch_local starts 2 processes
on 127.0.0.1 and runs it in each; on a TPU pod or a multi-node GPU job you
would run ``train`` directly on every host after
``shardopt.initialize_multihost()`` (see the README, "Multi-host"). The checkpoint is
then restored in this one process, on 4 devices: another topology.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import shardopt

STEPS = 10


def make_model():
    return eqx.nn.MLP(16, 4, 32, 2, key=jax.random.key(0))


def make_transform():
    return shardopt.adamw(1e-2, weight_decay=1e-4)


def loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def batch(step, sharding):
    """The global batch of ``step``; each process fills only its own shards."""
    rng = np.random.default_rng(step)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = np.cos(x[:, :4]).astype(np.float32)
    return tuple(
        jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i])
        for a in (x, y)
    )


def train(ckpt_dir):
    # Every process: the same mesh over all devices of the job, the same plan,
    mesh = Mesh(np.array(jax.devices()), ("data",))
    plan = shardopt.zero(3, mesh, "data", min_size=64)
    # parameters and optimizer state partitioned over "data" (ZeRO-3), ...
    model = plan.shard_params(make_model())
    opt = shardopt.Optimizer(make_transform(), model, plan=plan)
    # ... checked once to be the same everywhere (an error, not a hang).
    shardopt.check_processes_agree(mesh=mesh, model=model, opt=opt)

    value_and_grad = opt.plan.value_and_grad(loss)  # explicit gather/scatter

    @eqx.filter_jit(donate="all-except-first")
    def step(x, model, opt, y):
        value, grads = value_and_grad(model, x, y)
        model, opt = opt.step(model, grads)
        return value, model, opt

    data = NamedSharding(mesh, PartitionSpec("data"))
    with shardopt.CheckpointManager(ckpt_dir, max_to_keep=2) as ckpt:
        for i in range(STEPS):
            x, y = batch(i, data)
            value, model, opt = step(x, model, opt, y)
            if (i + 1) % 5 == 0:
                # Every process calls save (each writes its own shards).
                ckpt.save(i + 1, params=model, opt=opt, data={"next_batch": i + 1})
            if jax.process_index() == 0:  # only process 0 prints
                print(f"step {i + 1:2d}  loss {float(value.addressable_data(0)):.5f}")
    return float(value.addressable_data(0))


def restore(ckpt_dir):
    """In this (single) process, on 4 devices, from the plan alone."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    plan = shardopt.zero(3, mesh, "data", min_size=64)
    model_like = plan.abstract_params(make_model())
    opt_like = shardopt.Optimizer(make_transform(), model_like, plan=plan)
    with shardopt.CheckpointManager(ckpt_dir, create=False) as ckpt:
        return ckpt.restore(params=model_like, opt=opt_like)


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 4)  # for the restore, here
    ckpt_dir = os.path.join(
        sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(), "checkpoints"
    )
    start = time.monotonic()
    result = shardopt.launch_local(train, 2, 4, args=(ckpt_dir,), echo=True)
    print(
        f"trained on 2 processes x 4 devices in {result.seconds:.1f} s; "
        f"final loss per process: {result.values}"
    )
    got = restore(ckpt_dir)
    weight = got.opt.state[0].mu.layers[0].weight
    print(
        f"restored step {got.step} in 1 process on {jax.device_count()} devices "
        f"(optimizer count {int(got.opt.count)}, data {got.data}, first-layer "
        f"moments {weight.sharding.spec} over {len(weight.sharding.device_set)} "
        "devices)"
    )
    print(f"total {time.monotonic() - start:.1f} s")
