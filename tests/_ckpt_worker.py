"""Run in a subprocess by the fault tests: save step 1, then start step 2 and fail.

python _ckpt_worker.py DIR kill     # SIGKILL itself in the middle of step 2
python _ckpt_worker.py DIR diskfull # step 2 under a 2 MB file-size limit
"""

import os
import resource
import signal
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp

from shardopt.checkpoint import CheckpointError, CheckpointManager

directory, mode = sys.argv[1], sys.argv[2]
small = {"w": jnp.arange(1024.0)}
keys = jax.random.split(jax.random.key(0), 16)
big = {
    f"w{i}": jax.random.normal(k, (1024, 1024)) for i, k in enumerate(keys)
}  # 64 MiB
ckpt = CheckpointManager(directory)
ckpt.save(1, params=small)
ckpt.wait()
if mode == "kill":
    ckpt.save(2, params=big)
    # the save is under way in Orbax's background thread: die now
    os.kill(os.getpid(), signal.SIGKILL)
elif mode == "diskfull":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))
    try:
        ckpt.save(2, params=big)
        ckpt.wait()
    except CheckpointError as err:
        print("ERROR:", str(err).splitlines()[0])
        print("STEPS:", ckpt.all_steps())
        sys.exit(3)
    print("saved without error")
    sys.exit(0)
jax.effects_barrier()
