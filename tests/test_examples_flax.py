"""The Flax examples run end to end in a short mode (30 steps, ZeRO stage 3)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("script", "plot"),
    [("flax_nnx_mlp.py", "nnx_mlp_loss.png"), ("flax_linen_cnn.py", "linen_cnn.png")],
)
def test_example_short_run(script, plot, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = str(ROOT)
    env["TQDM_DISABLE"] = "1"
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"  # as tests/conftest.py
    command = [sys.executable, str(ROOT / "examples" / script)]
    command += ["--steps", "30", "--stage", "3", "--plots", str(tmp_path)]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "8 devices, mesh {'data': 4, 'model': 2}, ZeRO 3"
    assert lines[-1].startswith("final loss ")
    assert float(lines[-1].split()[-1]) < 1.0  # from ln(10) = 2.30 at the start
    assert (tmp_path / plot).stat().st_size > 0
