"""Multi-host with real processes on 127.0.0.1: training, checkpoints, failures.

Every job is bounded (``TIMEOUT``, heartbeat ``HEARTBEAT``): a hang fails the
test instead of the suite. The reference for every number is the same task
run in this pytest process (one process, 8 devices).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import multihost_tasks as tasks
import numpy as np
import pytest
from _ckpt_helpers import damage

import shardopt
from shardopt.distributed import _multihost

TIMEOUT = 90
HEARTBEAT = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"2x4": (2, 4), "4x2": (4, 2)}
STEPS = 10

multiprocess = pytest.mark.multiprocess


def launch(target, layout, **kwargs):
    num_processes, devices = layout
    start = time.monotonic()
    result = shardopt.launch_local(
        target,
        num_processes,
        devices,
        timeout=TIMEOUT,
        heartbeat_timeout=HEARTBEAT,
        **kwargs,
    )
    print(f"{target} on {num_processes}x{devices}: {time.monotonic() - start:.1f} s")
    return result


def assert_params_equal(got, want, exact=True):
    assert got.keys() == want.keys()
    for name in want:
        if exact:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        else:
            # Gloo's all-reduce adds the per-device gradients in another order
            # than XLA's in-process all-reduce: equal to a few ulps.
            np.testing.assert_allclose(
                got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name
            )


@pytest.fixture(scope="module")
def reference():
    """Ten steps of every ZeRO stage in this process on 8 devices."""
    return tasks.train_stages(STEPS)["train"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each layout trains every stage ten steps, saving at 5 and 10 (one job each).

    The 4 x 2 job then restores each stage of the 2 x 4 job's checkpoints: a
    save from 2 processes read by 4.
    """
    runs = {}
    for name, layout in LAYOUTS.items():
        root = str(tmp_path_factory.mktemp(f"ckpt_{name}"))
        kwargs = {"ckpt_root": root}
        if name == "4x2":
            kwargs["restore_root"] = runs["2x4"][1]
        start = time.monotonic()
        result = launch(
            "multihost_tasks:train_stages", layout, args=(STEPS,), kwargs=kwargs
        )
        runs[name] = (result, root, time.monotonic() - start)
    return runs


def saved_by(trained, layout, stage):
    """What process 0 of ``layout`` held when it saved ``stage`` at step 10."""
    result, root, _ = trained[layout]
    return result.values[0]["train"][stage], os.path.join(root, f"stage{stage}")


def assert_restored(got, saved, stage, num_devices):
    """A restore gives exactly what was saved, in the target plan's layout."""
    assert got["step"] == STEPS
    assert got["data"] == {"next_batch": STEPS}
    # Scalars saved from several processes: the step count and the schedule's
    # value at it come back exactly, replicated on the new mesh.
    assert got["count"] == STEPS
    assert got["count_replicated"]
    assert got["lr"] == saved["lr"]
    for what in ("params", "mu", "nu"):
        assert_params_equal(got[what], saved[what])
    assert got["mesh_devices"] == num_devices
    assert got["stage"] == (stage if num_devices > 1 else 0)
    partitioned = num_devices > 1 and stage >= 1
    assert got["mu_spec"] == ((None, "data") if partitioned else ())
    assert got["w0_spec"] == ((None, "data") if partitioned and stage == 3 else ())


# --- training --------------------------------------------------------------


@multiprocess
@pytest.mark.parametrize("stage", tasks.STAGES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_matches_one_process(trained, reference, layout, stage):
    result, _, _ = trained[layout]
    num_processes, devices = LAYOUTS[layout]
    want = reference[stage]
    assert len(result.values) == num_processes
    first = result.values[0]["train"][stage]
    for value in result.values:
        value = value["train"][stage]
        # Every process holds the same parameters and moments, bit for bit.
        for what in ("params", "mu", "nu"):
            assert_params_equal(value[what], first[what])
        assert value["process_count"] == num_processes
        assert value["device_count"] == num_processes * devices
        assert value["count"] == STEPS
        assert value["stage"] == stage
        # The same ZeRO layout as in one process: moments split over "data"
        # from stage 1, parameters too at stage 3.
        assert value["mu_spec"] == want["mu_spec"]
        assert value["w0_spec"] == want["w0_spec"]
    assert first["mu_spec"] == ((None, "data") if stage else ())
    assert first["w0_spec"] == ((None, "data") if stage == 3 else ())
    for what in ("params", "mu", "nu"):
        assert_params_equal(first[what], want[what], exact=False)
    assert first["lr"] == want["lr"]


# --- checkpoints -----------------------------------------------------------


@multiprocess
@pytest.mark.parametrize("num_devices", [8, 4, 1])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_save_from_all_processes_restores_in_one(trained, layout, num_devices):
    for stage in tasks.STAGES:
        saved, ckpt = saved_by(trained, layout, stage)
        got = tasks.restore(ckpt, stage, num_devices)
        assert_restored(got, saved, stage, num_devices)


@multiprocess
def test_save_from_two_processes_restores_in_four(trained):
    result, _, _ = trained["4x2"]
    for stage in tasks.STAGES:
        saved, _ = saved_by(trained, "2x4", stage)
        for value in result.values:
            got = value["restore"][stage]
            assert got["process_count"] == 4
            assert_restored(got, saved, stage, 8)


@multiprocess
@pytest.mark.parametrize("target_stage", [0, 1, 2])
def test_save_at_stage_3_restores_at_another_stage(trained, target_stage):
    saved, ckpt = saved_by(trained, "4x2", 3)
    got = tasks.restore(ckpt, target_stage, 8)
    assert_restored(got, saved, target_stage, 8)


# --- failures --------------------------------------------------------------


@multiprocess
def test_process_dying_mid_training_stops_the_others():
    start = time.monotonic()
    with pytest.raises(shardopt.LaunchError) as info:
        launch(
            "multihost_tasks:train",
            (2, 2),
            args=(STEPS,),
            kwargs={"stage": 2, "die_at_step": 3},
        )
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert message.startswith("process 1 of 2 failed first: killed by SIGKILL")
    survivor = info.value.result.processes[0]
    # The survivor stopped by itself (the coordinator saw the dead peer); the
    # launcher did not have to kill it.
    assert not survivor.killed_by_launcher
    assert survivor.returncode != 0
    assert "[process 0]" in message
    assert elapsed < 4 * HEARTBEAT + 30, elapsed


@multiprocess
def test_process_killed_mid_save_keeps_previous_checkpoint(tmp_path, reference):
    ckpt = str(tmp_path / "ckpt")
    kwargs = {"stage": 3, "ckpt_dir": ckpt, "save_every": 5}
    with pytest.raises(shardopt.LaunchError) as info:
        launch(
            "multihost_tasks:train",
            (2, 2),
            args=(STEPS,),
            kwargs={**kwargs, "die_during_save": 10},
        )
    assert "process 1 of 2 failed first: killed by SIGKILL" in str(info.value)
    # Step 5 is intact and restorable; the interrupted step 10 is not listed.
    assert shardopt.CheckpointManager(ckpt, create=False).all_steps() == [5]
    at_five = tasks.restore(ckpt, 3, 8)
    assert at_five["step"] == at_five["count"] == 5
    assert at_five["data"] == {"next_batch": 5}
    want = tasks.train(5, stage=3)
    for what in ("params", "mu", "nu"):
        assert_params_equal(at_five[what], want[what], exact=False)
    # Restarting the same job resumes from step 5 (through the manager) and
    # ends where an uninterrupted run ends.
    resumed = launch("multihost_tasks:train", (2, 2), args=(STEPS,), kwargs=kwargs)
    for value in resumed.values:
        assert value["resumed_from"] == 5
        assert value["count"] == STEPS
        for what in ("params", "mu", "nu"):
            assert_params_equal(value[what], reference[3][what], exact=False)
    assert shardopt.CheckpointManager(ckpt, create=False).all_steps() == [5, 10]


@multiprocess
def test_a_job_that_hangs_ends_at_its_timeout():
    start = time.monotonic()
    with pytest.raises(shardopt.LaunchError) as info:
        shardopt.launch_local("multihost_tasks:hang", 2, 1, timeout=8)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert elapsed < 8 + 10, elapsed
    # Each process's watchdog dumped its stacks and exited by itself.
    assert "Timeout (0:00:08)!" in message
    assert "in hang" in message


@multiprocess
def test_launching_a_script(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import sys, jax\n"
        "print('process', jax.process_index(), 'of', jax.process_count(),\n"
        "      'devices', jax.device_count(), 'args', sys.argv[1:])\n"
    )
    result = shardopt.launch_local(str(script), 2, 3, args=("a", 1), timeout=60)
    assert result.values == [None, None]
    for i, output in enumerate(result.outputs):
        assert f"process {i} of 2 devices 6 args ['a', '1']" in output


# --- bad input -------------------------------------------------------------


@multiprocess
@pytest.mark.parametrize("what", ["mesh", "params", "names"])
def test_processes_that_disagree_fail_on_every_process(what):
    start = time.monotonic()
    with pytest.raises(shardopt.LaunchError) as info:
        launch("multihost_tasks:mismatch", (2, 1), args=(what,))
    assert time.monotonic() - start < TIMEOUT
    for process in info.value.result.processes:
        # Every process raised the error itself, none was killed or aborted.
        assert process.returncode == 1, process.how()
        assert "ProcessMismatchError" in process.output
        differ = "the names of the items checked" if what == "names" else what
        assert f"disagree on {differ} (this is process" in process.output
        assert "processes [0]; processes [1]" in process.output
    output = info.value.result.processes[0].output
    if what == "mesh":
        assert "-axis_names=('data',)" in output
        assert "+axis_names=('data', 'model')" in output
    elif what == "params":
        assert "+['extra']: float32[3]" in output
        assert "+['w1']: float32[16,5]" in output


@multiprocess
def test_unreachable_coordinator_fails_within_timeout():
    port = shardopt.distributed._launch.free_port()  # nobody listens there
    code = (
        "import shardopt\n"
        f"shardopt.initialize_multihost('127.0.0.1:{port}', 2, 1, "
        "initialization_timeout=3, heartbeat_timeout_seconds=3)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 1
    assert (
        f"process 1 of 2 could not join the JAX distributed job through the "
        f"coordinator at 127.0.0.1:{port} within 3 s"
    ) in done.stderr, done.stderr
    assert elapsed < 30, elapsed


# --- the example -----------------------------------------------------------


@multiprocess
def test_example_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "multihost.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT + 30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restored step 10 in 1 process on 4 devices" in done.stdout, done.stdout
    assert "P('data', None) over 4 devices" in done.stdout, done.stdout


# --- the launcher and checks, without processes ----------------------------


def test_launcher_rejects_targets_other_processes_cannot_import():
    with pytest.raises(ValueError, match="importable module"):
        shardopt.launch_local(lambda: 0, 2)
    with pytest.raises(ValueError, match="'module:function'"):
        shardopt.launch_local("no_colon", 2)
    with pytest.raises(FileNotFoundError):
        shardopt.launch_local("missing_script.py", 2)
    with pytest.raises(ValueError, match=">= 1"):
        shardopt.launch_local("m:f", 0)


def test_check_processes_agree_in_one_process_checks_nothing():
    shardopt.check_processes_agree(mesh=tasks.make_mesh(), params={"a": 1})
    with pytest.raises(TypeError, match="at least one"):
        shardopt.check_processes_agree()


def test_describe_tree_ignores_values_and_addresses():
    params = {"w": np.zeros((2, 3), np.float32), "act": np.tanh, "n": 3}
    text = _multihost.describe_tree(params)
    assert "['w']: float32[2,3]" in text
    assert "0x" not in text
    same = {"w": np.ones((2, 3), np.float32), "act": np.tanh, "n": 4}
    assert _multihost.describe_tree(same) == text


def test_initialize_multihost_is_a_no_op_once_initialized(monkeypatch):
    monkeypatch.setattr(
        shardopt.distributed._multihost.jax.distributed, "is_initialized", lambda: True
    )
    shardopt.initialize_multihost()  # returns without touching jax.distributed


@multiprocess
def test_slices_split_between_processes_are_checked_once_and_agreed_on(tmp_path):
    """Saved in one process, restored by two with every saved slice split
    between them: each slice is read whole and checked by exactly one of the
    processes. A flipped byte makes every process raise the same
    ChecksumError, whichever process found it, also when the other process's
    own check failed (all of them then read earlier steps together: had that
    one raised its own error, the job would hang), and fallback=True takes
    every process back to the same intact step."""
    ckpt = str(tmp_path / "ckpt")
    values = tasks.split_slices_saved(ckpt)
    result = launch("multihost_tasks:restore_split_slices", (2, 4), args=(ckpt,))
    for value in result.values:
        assert value.get("step") == 2, value
        assert_params_equal(value["values"], {k: x + 1 for k, x in values.items()})
    checked = sorted(box for value in result.values for box in value["read_whole"])
    assert checked == sorted(
        [[[0, 64], [0, 64]]] + [[[r, r + 8], [0, 64]] for r in range(0, 64, 8)]
    )  # w whole, v's eight rows: each once

    def one_value_differs():  # the flip hit w's or v's values
        try:
            got = tasks.restore_split_slices(ckpt, verify=False)["values"]
        except KeyError:  # the read failed
            return False
        differ = [k for k, x in values.items() if not np.array_equal(got[k], x + 1)]
        return len(differ) == 1

    damage(os.path.join(ckpt, "2"), "flip", one_value_differs)
    result = launch("multihost_tasks:restore_split_slices", (2, 4), args=(ckpt,))
    messages = {value.get("message") for value in result.values}
    assert [value.get("error") for value in result.values] == ["ChecksumError"] * 2
    assert len(messages) == 1, messages  # the same on every process
    (message,) = messages
    assert "step 2" in message and "process" in message, message
    outcomes = []
    for process in (0, 1):  # one of them checks the damaged slice
        kwargs = {"check_fails_on": process}
        result = launch(
            "multihost_tasks:restore_split_slices", (2, 4), args=(ckpt,), kwargs=kwargs
        )
        outcomes.append([value.get("error") for value in result.values])
    assert ["ChecksumError"] * 2 in outcomes, outcomes  # found by the other
    result = launch(
        "multihost_tasks:restore_split_slices",
        (2, 4),
        args=(ckpt,),
        kwargs={"fallback": True},
    )
    for value in result.values:
        assert value.get("step") == 1, value
        assert_params_equal(value["values"], values)


@multiprocess
@pytest.mark.parametrize("process_0", ["reads", "reads a damaged file"])
def test_a_read_failing_otherwise_on_one_process_is_no_damage_on_any(
    tmp_path, process_0
):
    """A read that fails on process 1 for a reason other than a damaged file
    (no memory for a shard), while process 0 reads or finds a damaged file:
    every process raises the same plain CheckpointError, naming process 1's
    reason, and none looks for an earlier step (they would read it apart:
    the job would hang)."""
    ckpt = str(tmp_path / "ckpt")
    tasks.split_slices_saved(ckpt)
    target = "multihost_tasks:restore_split_slices"
    failures = {1: "memory"} | ({0: "damaged"} if "damaged" in process_0 else {})
    kwargs = {"failures": failures, "fallback": True}
    result = launch(target, (2, 4), args=(ckpt,), kwargs=kwargs)
    assert [value.get("error") for value in result.values] == ["CheckpointError"] * 2
    assert "process 1" in result.values[0]["message"], result.values[0]
    for value in result.values:
        assert "no room for a shard" in value["message"], value


@multiprocess
def test_a_read_failing_on_one_process_fails_on_every_process(tmp_path):
    """A read that fails on process 1 only: every process raises
    CorruptCheckpointError (none goes on with the step alone), and with
    fallback=True every process restores the same earlier step."""
    ckpt = str(tmp_path / "ckpt")
    values = tasks.split_slices_saved(ckpt)
    target = "multihost_tasks:restore_split_slices"
    result = launch(target, (2, 4), args=(ckpt,), kwargs={"failures": {1: "damaged"}})
    errors = [value.get("error") for value in result.values]
    assert errors == ["CorruptCheckpointError"] * 2, result.values
    assert "process 1" in result.values[0]["message"], result.values[0]
    assert "simulated" in result.values[1]["message"], result.values[1]
    kwargs = {"failures": {1: "damaged"}, "fallback": True}
    result = launch(target, (2, 4), args=(ckpt,), kwargs=kwargs)
    for value in result.values:
        assert value.get("step") == 1, value
        assert_params_equal(value["values"], values)
