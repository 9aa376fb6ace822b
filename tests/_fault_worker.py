"""A small training run that the fault harness SIGKILLs at chosen moments.

python _fault_worker.py DIR REF STEPS KILL

- ``REF`` is an ``.npz`` of the uninterrupted trajectory: ``KILL=reference``
  writes it (every step's parameters and optimizer arrays) and saves nothing.
- Otherwise the run resumes from the latest step in ``DIR`` (checking every
  visible step against ``REF``, bit for bit), trains to ``STEPS`` saving every
  step (async, ``max_to_keep=2``), and writes its final arrays to
  ``DIR/../final.npz``. ``KILL`` is ``none`` or ``KIND:STEP:ARG``, where KIND
  says where the process SIGKILLs itself at step STEP:

  step      inside the jitted step (a host callback), before its save
  async     ARG ms after ``save`` returned, while Orbax writes in the background
  checksum  in the background thread, before the checksums are written
  finalize  at the ARG-th rename of the commit (items, then the step itself)
  delete    while Orbax moves an old step away (``max_to_keep``): ARG=0 before,
            1 after the rename
  purge     halfway through removing the moved-away step
"""

import os
import signal
import sys
import threading
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint._src.path import atomicity, deleter

import shardopt
from shardopt.checkpoint import CheckpointManager, _handler, _housekeeping

directory, ref_path, steps, kill = (
    sys.argv[1],
    sys.argv[2],
    int(sys.argv[3]),
    sys.argv[4],
)
kind, kill_step, arg = "none", -1, 0
if kill not in ("none", "reference"):
    kind, kill_step, arg = kill.split(":")
    kill_step, arg = int(kill_step), int(arg)


def die(why: str) -> None:
    print(f"KILLED {why}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def initial():
    w = jnp.arange(256 * 64, dtype=jnp.float32).reshape(256, 64) / 1e4
    params = {"w": w, "b": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32)}
    return params, shardopt.Optimizer(shardopt.adamw(1e-2, weight_decay=1e-3), params)


def maybe_kill(count):
    if kind == "step" and int(count) == kill_step - 1:
        die(f"inside step {kill_step}")


@eqx.filter_jit
def train_step(params, opt):
    grads = jax.tree.map(lambda p: jnp.cos(p * (opt.count + 1).astype(p.dtype)), params)
    if kind == "step":
        jax.debug.callback(maybe_kill, opt.count)
    return opt.step(params, grads)


def arrays(params, opt):
    return [
        np.asarray(x) for x in jax.tree.leaves(eqx.filter((params, opt), eqx.is_array))
    ]


# ------------------------------------------------------------- the kill hooks
current = {"step": 0}
renames = {"n": 0}
rename = atomicity.async_path.rename


def step_of(path) -> int:
    """The step whose directory ``path`` is in (``<step>.orbax-checkpoint-tmp``
    or ``<step>``): the background thread writes and commits a step while the
    loop may already be at the next one, so ``current`` would race."""
    top = os.path.relpath(str(path), directory).split(os.sep)[0].split(".")[0]
    return int(top) if top.isdigit() else -1


async def killing_rename(src, dst):
    if kind == "finalize" and step_of(src) == kill_step:
        renames["n"] += 1
        if renames["n"] == arg:
            die(f"at rename {arg} of step {kill_step}: {os.path.basename(str(dst))}")
    return await rename(src, dst)


atomicity.async_path.rename = killing_rename
write_checksums = _handler.write


def killing_write(records, where):
    if kind == "checksum" and step_of(where) == kill_step:
        die(f"before the checksums of step {kill_step}")
    write_checksums(records, where)


_handler.write = killing_write
delete = deleter.StandardCheckpointDeleter.delete


def killing_delete(self, step):
    if kind == "delete" and current["step"] >= kill_step and arg == 0:
        die(f"before moving old step {step} away")
    delete(self, step)
    if kind == "delete" and current["step"] >= kill_step and arg == 1:
        die(f"after moving old step {step} away")


deleter.StandardCheckpointDeleter.delete = killing_delete
rmtree = _housekeeping.shutil.rmtree


def killing_rmtree(path, *a, **k):
    if (
        kind == "purge"
        and current["step"] >= kill_step
        and _housekeeping.DELETING in str(path)
    ):
        files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
        for name in files[: len(files) // 2]:
            os.remove(name)
        die(
            f"halfway through removing {path} ({len(files) // 2} of {len(files)} files)"
        )
    return rmtree(path, *a, **k)


_housekeeping.shutil.rmtree = killing_rmtree

# ------------------------------------------------------------------- the run
params, opt = initial()
if kill == "reference":
    trajectory = {}
    for step in range(1, steps + 1):
        params, opt = train_step(params, opt)
        for i, x in enumerate(arrays(params, opt)):
            trajectory[f"{step}/{i}"] = x
    np.savez(ref_path, **trajectory)
    sys.exit(0)

ref = np.load(ref_path)
ckpt = CheckpointManager(directory, max_to_keep=2)
start = 1
visible = ckpt.all_steps()
for step in visible:  # every visible step is complete and exact
    got = ckpt.restore(step, params=params, opt=opt)
    for i, x in enumerate(arrays(got.params, got.opt)):
        if x.tobytes() != ref[f"{step}/{i}"].tobytes():
            print(f"MISMATCH step {step} array {i}", flush=True)
            sys.exit(5)
if visible:
    got = ckpt.restore(params=params, opt=opt)
    params, opt, start = got.params, got.opt, got.step + 1
    print(f"RESUMED {got.step} of {visible}", flush=True)
for step in range(start, steps + 1):
    current["step"] = step
    params, opt = train_step(params, opt)
    ckpt.save(step, params=params, opt=opt)
    if kind == "async" and step == kill_step:
        threading.Timer(
            arg / 1000, die, (f"{arg} ms into the async save of {step}",)
        ).start()
        time.sleep(10)
ckpt.close()
np.savez(os.path.join(os.path.dirname(directory), "final.npz"), *arrays(params, opt))
print("FINISHED", flush=True)
