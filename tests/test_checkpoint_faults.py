"""Faults in subprocesses: SIGKILL at chosen moments, a normal exit with a save
pending, a full disk, a read-only directory, two writers.

The kill harness runs a small training script (tests/_fault_worker.py) that
kills itself at a moment chosen from a seed: inside a step, during an async
save, before the checksums, at a rename of the commit, while an old step is
moved away (max_to_keep) and while it is removed. After each kill the next run
checks that every visible step restores bit for bit equal to an uninterrupted
run, resumes from the latest, and the last run must end with the uninterrupted
run's final parameters and optimizer state. The short mode (default) injects
each kind of fault once; ``SHARDOPT_FAULTS=long`` draws faults from a recorded
seed (``SHARDOPT_FAULTS_SEED``, default 14) until 30 have killed the run (a
fault drawn for a step before the resume point cannot fire).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest

from shardopt.checkpoint import CheckpointLockedError, CheckpointManager

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 8
ENV = {**os.environ, "PYTHONPATH": ROOT}
ENV.pop("XLA_FLAGS", None)


def python(*args, **kwargs):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=kwargs.pop("env", ENV),
        **kwargs,
    )


def run_worker(directory, mode, **kwargs):
    return python(os.path.join(HERE, "_ckpt_worker.py"), str(directory), mode, **kwargs)


def faults(long: bool, seed: int) -> list[str]:
    """``KIND:STEP:ARG`` for each fault, in order, on one directory."""
    if not long:
        return [
            "step:3:0",
            "async:4:5",
            "checksum:5:0",
            "finalize:6:1",
            "delete:7:0",
            "purge:8:0",
        ]
    rng = random.Random(seed)
    kinds = ["step", "async", "checksum", "finalize", "delete", "purge"]
    out = []
    for _ in range(80):
        kind = rng.choice(kinds)
        step = rng.randint(3 if kind in ("delete", "purge") else 1, STEPS)
        arg = {"async": rng.randint(0, 40), "finalize": rng.randint(1, 3)}.get(
            kind, rng.randint(0, 1)
        )
        out.append(f"{kind}:{step}:{arg}")
    return out


@pytest.mark.multiprocess
def test_sigkill_at_chosen_moments_loses_nothing(tmp_path):
    long = os.environ.get("SHARDOPT_FAULTS") == "long"
    seed = int(os.environ.get("SHARDOPT_FAULTS_SEED", "14"))
    worker = os.path.join(HERE, "_fault_worker.py")
    ref, ckpt = str(tmp_path / "ref.npz"), str(tmp_path / "ckpt")
    done = python(worker, ckpt, ref, str(STEPS), "reference")
    assert done.returncode == 0, done.stderr[-3000:]
    log = []
    target = 30 if long else 6
    for fault in faults(long, seed):
        if sum("rc -9" in x for x in log) >= target:
            break
        got = python(worker, ckpt, ref, str(STEPS), fault)
        lines = [x for x in got.stdout.splitlines() if x.split(" ")[0] in WORDS]
        log.append(f"seed {seed} fault {fault}: rc {got.returncode}: {lines}")
        assert got.returncode in (-signal.SIGKILL, 0), "\n".join(log) + got.stderr
        assert not any("MISMATCH" in x for x in lines), "\n".join(log)
        if got.returncode == 0:  # the run finished before the moment came
            shutil.rmtree(ckpt)  # start over, so the next fault has work to hit
        visible = (
            [n for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
        )
        assert all(
            os.path.isfile(os.path.join(ckpt, n, "commit_success.txt")) for n in visible
        ), visible
    final = python(worker, ckpt, ref, str(STEPS), "none")
    assert final.returncode == 0, "\n".join(log) + final.stdout + final.stderr[-3000:]
    assert "FINISHED" in final.stdout
    want = np.load(ref)
    got = np.load(tmp_path / "final.npz")
    for i in range(len(got.files)):
        assert got[f"arr_{i}"].tobytes() == want[f"{STEPS}/{i}"].tobytes(), i
    # every kind of fault hit at least once (in the short mode: each exactly)
    killed = [x for x in log if "rc -9" in x]
    assert len(killed) >= target, "\n".join(log)
    # the leftovers of the last kill were removed when the last run opened it
    assert sorted(os.listdir(ckpt)) == [str(STEPS - 1), str(STEPS)]


WORDS = {"KILLED", "RESUMED", "MISMATCH", "FINISHED"}


@pytest.mark.multiprocess
def test_normal_exit_finishes_the_pending_save(tmp_path):
    result = run_worker(tmp_path, "exit")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SAVE RETURNED" in result.stdout
    assert "waiting for the asynchronous save of step 2" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    got = CheckpointManager(tmp_path).restore(
        params={f"w{i}": jnp.zeros((1024, 1024)) for i in range(4)}
    )
    assert got.step == 2


@pytest.mark.multiprocess
def test_disk_full_during_save(tmp_path):
    result = run_worker(tmp_path, "diskfull")
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    assert "saving step 2" in result.stdout and "failed" in result.stdout
    assert "STEPS: [1]" in result.stdout
    check_previous_intact(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1"]


def check_previous_intact(directory):
    ckpt = CheckpointManager(directory)
    assert ckpt.all_steps() == [1]
    got = ckpt.restore(params={"w": jnp.zeros(1024)})
    assert got.step == 1 and np.array_equal(got.params["w"], np.arange(1024.0))
    ckpt.close()


@pytest.mark.multiprocess
def test_read_only_directory(tmp_path):
    # root writes anywhere: the worker then runs as nobody (uid 65534)
    root = os.geteuid() == 0
    if root and shutil.which("setpriv") is None:
        pytest.skip("running as root, and no setpriv to drop to another user")
    base = tempfile.mkdtemp(dir="/tmp") if root else str(tmp_path)
    try:
        os.chmod(base, 0o755)
        directory = os.path.join(base, "ckpt")
        with CheckpointManager(directory) as ckpt:
            ckpt.save(1, params={"w": jnp.arange(1024.0)})
        for where, dirs, files in os.walk(directory):
            for name in [*dirs, *files]:
                mode = 0o555 if name in dirs else 0o444
                os.chmod(os.path.join(where, name), mode)
        os.chmod(directory, 0o555)
        env = {**ENV, "HOME": base}
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        result = subprocess.run(
            [
                *(prefix if root else []),
                sys.executable,
                os.path.join(HERE, "_ckpt_worker.py"),
                directory,
                "readonly",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
            cwd=base,
        )
        assert result.returncode == 3, result.stdout + result.stderr[-3000:]
        assert "RESTORED 1" in result.stdout
        assert f"cannot save into {directory}: Permission denied" in result.stdout
        assert "STEPS: [1]" in result.stdout
        assert sorted(os.listdir(directory)) == ["1"]
    finally:
        for where, dirs, _ in os.walk(base):
            for name in dirs:
                os.chmod(os.path.join(where, name), 0o755)
        os.chmod(base, 0o755)
        if root:
            shutil.rmtree(base)


@pytest.mark.multiprocess
def test_two_writers_in_two_processes(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_ckpt_worker.py"), str(tmp_path), "hold"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "HOLDING"
        os.makedirs(tmp_path / "2.orbax-checkpoint-tmp")  # as if it were saving
        second = CheckpointManager(tmp_path)  # opening does not touch its files
        assert os.path.isdir(tmp_path / "2.orbax-checkpoint-tmp")
        with pytest.raises(CheckpointLockedError, match=f"process {holder.pid} on"):
            second.save(2, params={"w": jnp.ones(4)})
        assert second.all_steps() == [1]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the holder is gone: its lock and partial step are removed, and saving works
    with caplog.at_level("WARNING", logger="shardopt.checkpoint"):
        third = CheckpointManager(tmp_path)
    assert ".shardopt-writer" in caplog.text and "2.orbax-checkpoint-tmp" in caplog.text
    third.save(2, params={"w": jnp.ones(4)})
    third.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
