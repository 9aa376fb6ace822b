"""Faults during a save, in a subprocess: SIGKILL mid async save, a full disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from shardopt.checkpoint import CheckpointManager

WORKER = os.path.join(os.path.dirname(__file__), "_ckpt_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(directory, mode):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, WORKER, str(directory), mode],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def check_previous_intact(directory):
    ckpt = CheckpointManager(directory)
    assert ckpt.all_steps() == [1]
    got = ckpt.restore(params={"w": jnp.zeros(1024)})
    assert got.step == 1 and np.array_equal(got.params["w"], np.arange(1024.0))
    ckpt.close()


@pytest.mark.multiprocess
def test_sigkill_mid_async_save(tmp_path):
    result = run_worker(tmp_path, "kill")
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    leftovers = sorted(os.listdir(tmp_path))
    assert "1" in leftovers and "2" not in leftovers, leftovers
    # the partial step-2 directory, if any, is ignored and then cleaned up
    check_previous_intact(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1"]


@pytest.mark.multiprocess
def test_disk_full_during_save(tmp_path):
    result = run_worker(tmp_path, "diskfull")
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    assert "saving step 2" in result.stdout and "failed" in result.stdout
    assert "STEPS: [1]" in result.stdout
    check_previous_intact(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1"]
