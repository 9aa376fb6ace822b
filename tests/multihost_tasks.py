"""Functions that the multi-host tests run in every process of a local job.

Each also runs in the pytest process itself (one process, 8 devices) as the
reference, so the same code is compared with itself across layouts. Nothing
here calls ``jax.distributed.initialize``: the launcher did that already.
"""

from __future__ import annotations

import itertools
import os
import signal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import shardopt

jax.config.update("jax_numpy_dtype_promotion", "strict")

DATA = "data"
BATCH = 32
SIZES = (8, 16, 4)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D "data" mesh over the first ``num_devices`` global devices."""
    devices = jax.devices()[: num_devices or jax.device_count()]
    return Mesh(np.array(devices), (DATA,))


def initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    params = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(SIZES)):
        scale = 1 / np.sqrt(n_in)
        params[f"w{i}"] = rng.normal(0, scale, (n_in, n_out)).astype(np.float32)
        params[f"b{i}"] = np.zeros(n_out, np.float32)
    return params


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The global batch of ``step``: the same on every process and layout."""
    rng = np.random.default_rng(1000 + step)
    x = rng.normal(size=(BATCH, SIZES[0])).astype(np.float32)
    y = np.sin(x[:, : SIZES[-1]] * 2).astype(np.float32)
    return x, y


def loss(params, x, y):
    h = x
    for i in range(len(SIZES) - 1):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < len(SIZES) - 2:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


def state_spec(leaf, data_size: int) -> PartitionSpec:
    """ZeRO-1 by hand: a leaf's first dimension on "data" when it divides."""
    if leaf.ndim >= 1 and leaf.shape[0] % data_size == 0:
        return PartitionSpec(DATA)
    return PartitionSpec()


def shardings(tree, mesh: Mesh, partition: bool):
    size = mesh.shape[DATA]
    return jax.tree.map(
        lambda x: NamedSharding(
            mesh, state_spec(x, size) if partition else PartitionSpec()
        ),
        tree,
    )


def constrain(tree, mesh: Mesh, partition: bool):
    arrays, rest = eqx.partition(tree, eqx.is_array)
    arrays = jax.lax.with_sharding_constraint(
        arrays, shardings(arrays, mesh, partition)
    )
    return eqx.combine(arrays, rest)


def is_leaf(x) -> bool:
    """An array or its abstract stand-in: what a checkpoint holds."""
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct))


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value: each process fills only its own shards."""
    return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])


def make_transform():
    return shardopt.adamw(shardopt.linear_schedule(3e-2, 1e-2, 10), weight_decay=1e-2)


def setup(mesh: Mesh):
    """Replicated parameters and a ZeRO-1 optimizer, built on ``mesh``."""
    params = {
        k: global_array(v, NamedSharding(mesh, PartitionSpec()))
        for k, v in initial_params().items()
    }

    @eqx.filter_jit
    def init(params):
        return constrain(shardopt.Optimizer(make_transform(), params), mesh, True)

    return params, init(params)


def abstract_state(mesh: Mesh):
    """The checkpoint tree's abstract target on ``mesh``: no manual arguments."""
    params, opt = eqx.filter_eval_shape(
        lambda: (
            initial_params(),
            shardopt.Optimizer(make_transform(), initial_params()),
        )
    )
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        params,
        shardings(params, mesh, False),
    )
    arrays = eqx.filter(opt, is_leaf)
    arrays = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        arrays,
        shardings(arrays, mesh, True),
    )
    return {"params": params, "opt": arrays}, opt


def make_step(mesh: Mesh):
    @eqx.filter_jit(donate="all-except-first")
    def step(x, params, opt, y):
        grads = jax.grad(loss)(params, x, y)
        params, opt = opt.step(params, grads)
        return constrain(params, mesh, False), constrain(opt, mesh, True)

    data = NamedSharding(mesh, PartitionSpec(DATA))

    def run(params, opt, i):
        x, y = batch(i)
        return step(global_array(x, data), params, opt, global_array(y, data))

    return run


def summary(params, opt, mesh: Mesh) -> dict:
    """What a test compares: parameters, step count, a hyperparameter, layouts."""
    lr = opt.transform.transforms[-1].learning_rate
    return {
        "params": {k: np.asarray(v.addressable_data(0)) for k, v in params.items()},
        "count": int(opt.count.addressable_data(0)),
        "lr": float(lr(opt.count).addressable_data(0))
        if callable(lr)
        else float(lr.addressable_data(0)),
        "mu_spec": tuple(opt.state[0].mu["w1"].sharding.spec),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "mesh_devices": mesh.size,
    }


def train(
    steps: int,
    ckpt_dir: str | None = None,
    save_every: int = 0,
    die_during_save: int | None = None,
    die_at_step: int | None = None,
    num_devices: int | None = None,
) -> dict:
    """Train ``steps`` steps, saving every ``save_every``; resume if a save exists.

    ``die_during_save=s``: process 1 kills itself right after starting the save
    of step ``s`` (an async save: its files are being written).
    ``die_at_step=s``: process 1 kills itself before step ``s``.
    """
    mesh = make_mesh(num_devices)
    params, opt = setup(mesh)
    shardopt.check_processes_agree(mesh=mesh, params=params, opt=opt)
    start = 0
    manager = None
    if ckpt_dir is not None:
        manager = ocp.CheckpointManager(
            ckpt_dir,
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True),
        )
        latest = manager.latest_step()
        if latest is not None:
            target, opt_like = abstract_state(mesh)
            restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
            params = restored["params"]
            opt = eqx.combine(
                restored["opt"], eqx.filter(opt_like, is_leaf, inverse=True)
            )
            start = latest
    run = make_step(mesh)
    for i in range(start, steps):
        if die_at_step == i and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        params, opt = run(params, opt, i)
        if manager is not None and save_every and (i + 1) % save_every == 0:
            tree = {"params": params, "opt": eqx.filter(opt, eqx.is_array)}
            manager.save(i + 1, args=ocp.args.StandardSave(tree))
            if die_during_save == i + 1 and jax.process_index() == 1:
                os.kill(os.getpid(), signal.SIGKILL)
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    out = summary(params, opt, mesh)
    out["resumed_from"] = start
    return out


def restore(ckpt_dir: str, num_devices: int | None = None) -> dict:
    """Restore the latest checkpoint onto a mesh of ``num_devices`` devices."""
    mesh = make_mesh(num_devices)
    target, opt_like = abstract_state(mesh)
    with ocp.CheckpointManager(ckpt_dir) as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    opt = eqx.combine(restored["opt"], eqx.filter(opt_like, is_leaf, inverse=True))
    out = summary(restored["params"], opt, mesh)
    out["step"] = step
    return out


def mismatch(what: str) -> None:
    """Process 1 builds a different mesh or parameter tree, then checks."""
    devices = np.array(jax.devices())
    mesh = Mesh(devices, (DATA,))
    params = initial_params()
    if jax.process_index() == 1:
        if what == "mesh":
            mesh = Mesh(devices.reshape(-1, 2), (DATA, "model"))
        elif what == "params":
            params["w1"] = np.zeros((16, 5), np.float32)
            params["extra"] = np.zeros(3, np.float32)
        elif what == "names":
            shardopt.check_processes_agree(mesh=mesh, model=params)
            return
    shardopt.check_processes_agree(mesh=mesh, params=params)


def hang() -> None:
    """Process 0 waits forever in a collective that process 1 never joins."""
    if jax.process_index() == 1:
        import time

        time.sleep(3600)
    mesh = make_mesh()
    x = global_array(
        np.ones(jax.device_count(), np.float32),
        NamedSharding(mesh, PartitionSpec(DATA)),
    )
    jax.jit(jnp.sum)(x).block_until_ready()
