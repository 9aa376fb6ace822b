"""The main example runs end to end (here at ZeRO stage 3, the demo runs stage 1)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_train_mlp_example_at_stage_3():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_mlp.py"), "--stage", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "8 cpu devices, ZeRO stage 3"
    final_loss = float(lines[-2].split()[-1])
    assert final_loss < 0.01
    assert lines[-1] == (
        "checkpoint of step 300 restored onto 4 devices at stage 0: "
        "parameters equal = True, optimizer count = 300"
    )
