"""The shardopt-ckpt command line: inspect, verify, export, bad directories."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from shardopt.checkpoint import CheckpointManager, main


def make(tmp_path):
    directory = tmp_path / "ckpt"
    with CheckpointManager(directory) as ckpt:
        ckpt.save(3, params={"w": jnp.arange(64.0).reshape(8, 8)}, metadata={"a": 1})
    return str(directory)


def test_inspect_verify_export(tmp_path, capsys):
    directory = make(tmp_path)
    assert main(["inspect", directory]) == 0
    out = capsys.readouterr().out
    assert "steps: [3]" in out and "w  float32[8,8]" in out and '{"a": 1}' in out
    assert "total: 1 arrays, 256 B" in out
    assert main(["verify", directory, "--step", "3"]) == 0
    assert "OK, 1 arrays" in capsys.readouterr().out
    out_file = str(tmp_path / "p.npz")
    assert main(["export", directory, "--step", "3", "--params-only", out_file]) == 0
    assert np.array_equal(np.load(out_file)["w"], np.arange(64.0).reshape(8, 8))
    out_dir = str(tmp_path / "exported")
    assert main(["export", directory, "--step", "3", "--params-only", out_dir]) == 0
    assert os.path.isdir(out_dir)


def test_bad_directory_and_step(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardopt-ckpt: error:") and err.count("\n") == 1
    os.makedirs(tmp_path / "empty")
    assert main(["verify", str(tmp_path / "empty")]) == 2
    assert "no fully written checkpoint" in capsys.readouterr().err
    directory = make(tmp_path)
    assert main(["inspect", directory, "--step", "9"]) == 2
    assert "no step 9" in capsys.readouterr().err
