"""Functions that the multi-host tests run in every process of a local job.

Each also runs in the pytest process itself (one process, 8 devices) as the
reference, so the same code is compared with itself across layouts. Nothing
here calls ``jax.distributed.initialize``: the launcher did that already.

Training goes through a ZeRO plan (``shardopt.zero``), ``Optimizer(...,
plan=plan)`` and the plan's explicit ``value_and_grad``; checkpoints through
``shardopt.CheckpointManager`` with like-objects built from the plan only.
"""

from __future__ import annotations

import itertools
import os
import signal
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import shardopt
from shardopt.checkpoint import _handler

jax.config.update("jax_numpy_dtype_promotion", "strict")

DATA = "data"
BATCH = 32
SIZES = (8, 16, 4)
STAGES = (0, 1, 2, 3)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D "data" mesh over the first ``num_devices`` global devices."""
    devices = jax.devices()[: num_devices or jax.device_count()]
    return Mesh(np.array(devices), (DATA,))


def make_plan(stage: int, num_devices: int | None = None):
    """ZeRO ``stage`` on the "data" mesh; stage 0 when there is one device."""
    mesh = make_mesh(num_devices)
    return shardopt.zero(stage if mesh.size > 1 else 0, mesh, DATA, min_size=0)


def initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    params = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(SIZES)):
        scale = 1 / np.sqrt(n_in)
        params[f"w{i}"] = rng.normal(0, scale, (n_in, n_out)).astype(np.float32)
        params[f"b{i}"] = rng.normal(0, 0.1, n_out).astype(np.float32)
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


def global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value: each process fills only its own shards."""
    return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])


def make_transform():
    return shardopt.adamw(shardopt.linear_schedule(3e-2, 1e-2, 10), weight_decay=1e-2)


def setup(plan):
    """Parameters in the plan's layout and a ZeRO optimizer, built from the plan."""
    values = initial_params()
    like = plan.abstract_params(values)
    params = {k: global_array(values[k], like[k].sharding) for k in values}
    return params, shardopt.Optimizer(make_transform(), params, plan=plan)


def like(plan):
    """Restore targets from the plan alone: no arrays, no manual arguments."""
    params = plan.abstract_params(initial_params())
    return params, shardopt.Optimizer(make_transform(), params, plan=plan)


def make_step(opt):
    value_and_grad = opt.plan.value_and_grad(loss)

    @eqx.filter_jit(donate="all-except-first")
    def step(x, params, opt, y):
        value, grads = value_and_grad(params, x, y)
        params, opt = opt.step(params, grads)
        return value, params, opt

    data = NamedSharding(opt.plan.mesh, PartitionSpec(DATA))

    def run(params, opt, i):
        x, y = batch(i)
        _, params, opt = step(global_array(x, data), params, opt, global_array(y, data))
        return params, opt

    return run


def gather(x: jax.Array) -> np.ndarray:
    """The whole value of a global array on this process (every process calls)."""
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def spec(x: jax.Array) -> tuple:
    """``x``'s PartitionSpec as a tuple, without trailing ``None`` entries."""
    entries = list(x.sharding.spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def summary(params, opt) -> dict:
    """What a test compares: parameters, moments, count, schedule value, layouts."""
    adam = opt.state[0]
    lr = opt.transform.transforms[-1].learning_rate
    return {
        "params": {k: gather(v) for k, v in params.items()},
        "mu": {k: gather(v) for k, v in adam.mu.items()},
        "nu": {k: gather(v) for k, v in adam.nu.items()},
        "count": int(gather(opt.count)),
        "lr": float(gather(eqx.filter_jit(lambda f, c: f(c))(lr, opt.count))),
        "stage": opt.plan.stage,
        "w0_spec": spec(params["w0"]),
        "mu_spec": spec(adam.mu["w0"]),
        "count_replicated": opt.count.sharding.is_fully_replicated,
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "mesh_devices": opt.plan.mesh.size,
    }


def train(
    steps: int,
    stage: int = 1,
    ckpt_dir: str | None = None,
    save_every: int = 0,
    die_during_save: int | None = None,
    die_at_step: int | None = None,
    num_devices: int | None = None,
) -> dict:
    """Train ``steps`` steps, saving every ``save_every``; resume if a save exists.

    ``die_during_save=s``: process 1 kills itself right after starting the
    (asynchronous) save of step ``s``, while its files are being written.
    ``die_at_step=s``: process 1 kills itself before step ``s``.
    """
    start_time = time.monotonic()
    plan = make_plan(stage, num_devices)
    params, opt = setup(plan)
    shardopt.check_processes_agree(mesh=plan.mesh, params=params, opt=opt)
    start = 0
    manager = None
    if ckpt_dir is not None:
        manager = shardopt.CheckpointManager(ckpt_dir, max_to_keep=None)
        if manager.latest_step() is not None:
            params_like, opt_like = like(plan)
            got = manager.restore(params=params_like, opt=opt_like)
            params, opt, start = got.params, got.opt, got.step
    if die_during_save is not None and jax.process_index() == 1:
        _die_while_committing(die_during_save)
    run = make_step(opt)
    for i in range(start, steps):
        if die_at_step == i and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        params, opt = run(params, opt, i)
        if manager is not None and save_every and (i + 1) % save_every == 0:
            manager.save(i + 1, params=params, opt=opt, data={"next_batch": i + 1})
    if manager is not None:
        manager.close()
    out = summary(params, opt)
    out["resumed_from"] = start
    out["seconds"] = time.monotonic() - start_time
    return out


def _die_while_committing(step: int) -> None:
    """Make this process SIGKILL itself inside the background commit of ``step``.

    Deterministic: ``save`` has returned and the step's files are being written,
    but the step cannot be complete, since its commit waits for this process's
    checksums. (Killing right after ``save`` returned raced with the commit of a
    small step.)
    """
    write = _handler.write

    def killing_write(records, directory):
        if os.path.basename(os.path.dirname(directory)).split(".")[0] == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        write(records, directory)

    _handler.write = killing_write


def restore(ckpt_dir: str, stage: int, num_devices: int | None = None) -> dict:
    """Restore the latest step of ``ckpt_dir`` onto a plan of ``stage``."""
    plan = make_plan(stage, num_devices)
    params_like, opt_like = like(plan)
    with shardopt.CheckpointManager(ckpt_dir, create=False) as manager:
        got = manager.restore(params=params_like, opt=opt_like)
    out = summary(got.params, got.opt)
    out["step"] = got.step
    out["data"] = got.data
    return out


def train_stages(
    steps: int,
    ckpt_root: str | None = None,
    restore_root: str | None = None,
    stages=STAGES,
) -> dict:
    """One job for one layout: every ZeRO stage trained (and saved), in turn.

    With ``ckpt_root``, stage ``s`` saves at steps 5 and ``steps`` into
    ``ckpt_root/stage{s}``. With ``restore_root``, the latest step of each
    ``restore_root/stage{s}`` (saved by another job) is then restored here.
    """
    out = {"train": {}, "restore": {}}
    for stage in stages:
        ckpt = None if ckpt_root is None else os.path.join(ckpt_root, f"stage{stage}")
        out["train"][stage] = train(steps, stage, ckpt, save_every=5 if ckpt else 0)
    if restore_root is not None:
        for stage in stages:
            start = time.monotonic()
            got = restore(os.path.join(restore_root, f"stage{stage}"), stage)
            got["seconds"] = time.monotonic() - start
            out["restore"][stage] = got
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
        time.sleep(3600)
    mesh = make_mesh()
    x = global_array(
        np.ones(jax.device_count(), np.float32),
        NamedSharding(mesh, PartitionSpec(DATA)),
    )
    jax.jit(jnp.sum)(x).block_until_ready()


SPLIT_SHAPE = (64, 64)


def split_slices_saved(ckpt_dir: str) -> dict[str, np.ndarray]:
    """Save (in one process, 8 devices) ``w`` whole (replicated: one saved
    slice) and ``v`` in 8 row slices, at step 1, and the same plus one at
    step 2; return the values of step 1."""
    mesh = make_mesh()
    values = {
        "w": np.arange(4096, dtype=np.float32).reshape(SPLIT_SHAPE),
        "v": -np.arange(4096, dtype=np.float32).reshape(SPLIT_SHAPE),
    }
    specs = {"w": PartitionSpec(), "v": PartitionSpec(DATA)}
    params = {
        k: global_array(x, NamedSharding(mesh, specs[k])) for k, x in values.items()
    }
    with shardopt.CheckpointManager(ckpt_dir) as manager:
        manager.save(1, params=params)
        manager.save(2, params={k: x + 1 for k, x in params.items()})
    return values


def restore_split_slices(
    ckpt_dir: str,
    fallback: bool = False,
    failures: dict[int, str] | None = None,
    verify: bool | None = None,
    check_fails_on: int | None = None,
) -> dict:
    """Restore the latest step of :func:`split_slices_saved` with every saved
    slice split between the processes: ``w`` in row blocks, ``v`` in column
    blocks. Returns the step and values (or the error) and the slices this
    process read whole to check them. ``failures`` maps a process to how the
    first shard it reads fails: as a damaged file does (``"damaged"``) or for
    another reason (``"memory"``: its buffer cannot be made). With
    ``check_fails_on``, that process's check of the bytes fails (and is not
    made), in the first step it restores."""
    from shardopt.checkpoint import _array_read, _reads, _verify

    mesh = make_mesh()
    specs = {"w": PartitionSpec(DATA), "v": PartitionSpec(None, DATA)}
    like = {
        k: jax.ShapeDtypeStruct(
            SPLIT_SHAPE, jnp.float32, sharding=NamedSharding(mesh, s)
        )
        for k, s in specs.items()
    }
    read_whole, wholes = _reads._read_whole, []

    def counting(t, box):
        wholes.append(box)
        return read_whole(t, box)

    _reads._read_whole = counting
    read_into, aligned_empty = _array_read._read_into, _array_read.aligned_empty

    async def damaged_once(*args):  # a read that fails on this process only
        _array_read._read_into = read_into
        raise OSError("simulated: a chunk could not be read")

    def no_memory_once(*args):
        _array_read.aligned_empty = aligned_empty
        raise MemoryError("simulated: no room for a shard")

    failure = (failures or {}).get(jax.process_index())
    if failure == "damaged":
        _array_read._read_into = damaged_once
    elif failure == "memory":
        _array_read.aligned_empty = no_memory_once
    check_shard = _verify.Verifier.shard

    def check_fails(self, *args):  # this restore's check (not a fallback's)
        _verify.Verifier.shard = check_shard
        self._failed = MemoryError("simulated: no room to check")

    if jax.process_index() == check_fails_on:
        _verify.Verifier.shard = check_fails
    try:
        with shardopt.CheckpointManager(ckpt_dir, create=False) as manager:
            got = manager.restore(params=like, fallback=fallback, verify=verify)
        out = {
            "step": got.step,
            "values": {k: gather(x) for k, x in got.params.items()},
        }
    except Exception as err:
        out = {"error": type(err).__name__, "message": str(err)}
    finally:
        _reads._read_whole, _verify.Verifier.shard = read_whole, check_shard
        _array_read._read_into, _array_read.aligned_empty = read_into, aligned_empty
    out["read_whole"] = wholes
    return out
