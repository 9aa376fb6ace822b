"""Run in a subprocess by the fault tests: save step 1, then one of these modes.

python _ckpt_worker.py DIR diskfull  # step 2 under a 2 MB file-size limit
python _ckpt_worker.py DIR readonly  # restore step 1 and try to save step 2
python _ckpt_worker.py DIR hold      # save step 1, hold the directory, sleep
python _ckpt_worker.py DIR exit      # save step 2 asynchronously and simply end
"""

import os
import resource
import signal
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import jax
import jax.numpy as jnp

from shardopt.checkpoint import CheckpointError, CheckpointManager

directory, mode = sys.argv[1], sys.argv[2]
small = {"w": jnp.arange(1024.0)}
keys = jax.random.split(jax.random.key(0), 4)
big = {
    f"w{i}": jax.random.normal(k, (1024, 1024)) for i, k in enumerate(keys)
}  # 16 MiB
ckpt = CheckpointManager(directory)
if mode == "readonly":
    print("RESTORED", ckpt.restore(params=small).step, flush=True)
else:
    ckpt.save(1, params=small)
    ckpt.wait()
if mode == "diskfull":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))
if mode in ("diskfull", "readonly"):
    try:
        ckpt.save(2, params=big)
        ckpt.wait()
    except CheckpointError as err:
        print("ERROR:", str(err).splitlines()[0])
        print("STEPS:", ckpt.all_steps())
        sys.exit(3)
    print("saved without error")
    sys.exit(0)
if mode == "hold":
    print("HOLDING", flush=True)
    time.sleep(120)
if mode == "exit":
    ckpt.save(2, params=big)
    print("SAVE RETURNED", flush=True)
    # no wait(), no close(): the interpreter's exit must finish the save
