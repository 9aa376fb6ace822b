"""Train across 2 local processes x 4 CPU devices, checkpoint, restore in 1 process.

    python examples/multihost.py [CHECKPOINT_DIR]

``train`` is what every process of a multi-host job runs: the same calls in
the same order on every process. Here shardopt.launch_local starts 2 processes
on 127.0.0.1 and runs it in each; on a TPU pod or a multi-node GPU job you
would run ``train`` directly on every host after
``shardopt.initialize_multihost()`` (see docs/multihost.md).
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
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import shardopt

STEPS = 10


def shard_spec(x, n):
    """ZeRO-1 by hand: moments split over "data" on a dimension that divides."""
    return PartitionSpec("data") if x.ndim and x.shape[0] % n == 0 else PartitionSpec()


def constrain(tree, mesh, partition):
    arrays, rest = eqx.partition(tree, eqx.is_array)
    n = mesh.shape["data"]
    specs = jax.tree.map(
        lambda x: NamedSharding(
            mesh, shard_spec(x, n) if partition else PartitionSpec()
        ),
        arrays,
    )
    return eqx.combine(jax.lax.with_sharding_constraint(arrays, specs), rest)


def batch(step, sharding):
    """The global batch of ``step``; each process fills only its own shards."""
    rng = np.random.default_rng(step)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = np.cos(x[:, :4]).astype(np.float32)
    return tuple(
        jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i])
        for a in (x, y)
    )


def loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def abstract_target(mesh):
    """What a restore needs: shapes, dtypes and shardings on the mesh, no data."""
    model, opt = eqx.filter_eval_shape(make, mesh)
    is_leaf = lambda x: isinstance(x, jax.ShapeDtypeStruct)
    tree = {"model": eqx.filter(model, is_leaf), "opt": eqx.filter(opt, is_leaf)}
    n = mesh.shape["data"]
    return jax.tree.map(
        lambda x, p: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh, p)
        ),
        tree,
        {
            "model": jax.tree.map(lambda _: PartitionSpec(), tree["model"]),
            "opt": jax.tree.map(lambda x: shard_spec(x, n), tree["opt"]),
        },
    )


def make(mesh):
    model = eqx.nn.MLP(16, 4, 32, 2, key=jax.random.key(0))
    opt = shardopt.Optimizer(shardopt.adamw(1e-2), model)
    return constrain(model, mesh, False), constrain(opt, mesh, True)


def train(ckpt_dir):
    # Every process: the same mesh over all devices of the job, ...
    mesh = Mesh(np.array(jax.devices()), ("data",))
    model, opt = eqx.filter_jit(make)(mesh)
    # ... checked once to be the same everywhere (an error, not a hang).
    shardopt.check_processes_agree(mesh=mesh, model=model, opt=opt)

    @eqx.filter_jit(donate="all-except-first")
    def step(x, model, opt, y):
        value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
        model, opt = opt.step(model, grads)
        return value, constrain(model, mesh, False), constrain(opt, mesh, True)

    data = NamedSharding(mesh, PartitionSpec("data"))
    manager = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2)
    )
    for i in range(STEPS):
        x, y = batch(i, data)
        value, model, opt = step(x, model, opt, y)
        if (i + 1) % 5 == 0:
            # Every process calls save (each writes its own shards).
            tree = {
                "model": eqx.filter(model, eqx.is_array),
                "opt": eqx.filter(opt, eqx.is_array),
            }
            manager.save(i + 1, args=ocp.args.StandardSave(tree))
        if jax.process_index() == 0:  # only process 0 prints
            print(f"step {i + 1:2d}  loss {float(value.addressable_data(0)):.5f}")
    manager.wait_until_finished()
    manager.close()
    return float(value.addressable_data(0))


def restore(ckpt_dir):
    """In this (single) process, on its own devices: a different topology."""
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with ocp.CheckpointManager(ckpt_dir) as manager:
        step = manager.latest_step()
        restored = manager.restore(
            step, args=ocp.args.StandardRestore(abstract_target(mesh))
        )
    return step, restored


if __name__ == "__main__":
    ckpt_dir = os.path.join(
        sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(), "checkpoints"
    )
    start = time.monotonic()
    result = shardopt.launch_local(train, 2, 4, args=(ckpt_dir,), echo=True)
    print(
        f"trained on 2 processes x 4 devices in {result.seconds:.1f} s; "
        f"final loss per process: {result.values}"
    )
    step, restored = restore(ckpt_dir)
    count = int(restored["opt"].count)
    print(f"restored step {step} in 1 process (optimizer count {count})")
    print(f"total {time.monotonic() - start:.1f} s")
