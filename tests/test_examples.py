"""The examples run end to end: train_mlp at ZeRO stage 3 (the demo runs stage 1),
equinox_gpt (resume exactness) and restore_on_new_mesh in a short mode."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

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


# ------------------------------------------------- equinox_gpt, restore_on_new_mesh
# In this process, so that the runs share their compiled steps: a tiny model,
# a few steps. The default runs are timed in docs/examples.md.
# Every run has the same shapes and schedule (--steps 6; --stop-after cuts one
# short), so the runs of one stage compile their step once.
TINY = ["--batch", "16", "--context", "16", "--width", "32", "--depth", "1"]
TINY += ["--heads", "2", "--steps", "6"]


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import equinox_gpt
        import restore_on_new_mesh

        yield equinox_gpt, restore_on_new_mesh
    finally:
        sys.path.remove(str(ROOT / "examples"))


@pytest.mark.parametrize("stage", [1, 3])
def test_gpt_resume_continues_bit_for_bit(examples, tmp_path, stage):
    gpt = examples[0]
    args = [*TINY, "--ckpt-every", "3", "--stage", str(stage)]
    args += ["--sample", "12", "--no-plots"]
    whole = gpt.main([*args, "--out", str(tmp_path / "whole")])
    cut = gpt.main([*args, "--out", str(tmp_path / "cut"), "--stop-after", "3"])
    assert len(whole["losses"]) == 6
    assert cut["losses"] == whole["losses"][:3]
    resumed = gpt.main([*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert resumed["first_step"] == 4
    # Python floats read from float32 losses: == is bit for bit
    assert resumed["losses"] == whole["losses"]
    assert whole["losses"][-1] < whole["losses"][0]
    assert len(resumed["sample"]) == len("def ") + 12
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["3", "6"]
    saved = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert saved["losses"] == whole["losses"]


def test_gpt_writes_plots_or_says_why(examples, tmp_path, capsys):
    gpt = examples[0]
    out = tmp_path / "run"
    args = [*TINY, "--stop-after", "2", "--sample", "0", "--out", str(out)]
    result = gpt.main(args)
    printed = capsys.readouterr().out
    for stage in range(4):
        assert f"ZeRO stage {stage}: params" in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result["plots"] == []
        assert "matplotlib is not installed" in printed
    else:
        assert result["plots"] == [str(out / "loss.png"), str(out / "memory.png")]
        for path in result["plots"]:
            data = pathlib.Path(path).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 100_000


def test_gpt_resume_refuses_another_run_configuration(examples, tmp_path):
    gpt = examples[0]
    out = ["--out", str(tmp_path / "run"), "--sample", "0", "--no-plots"]
    with pytest.raises(SystemExit, match="no checkpoint in"):
        gpt.main([*TINY, *out, "--resume"])
    gpt.main([*TINY, *out, "--stop-after", "2"])
    wider = [a if a != "32" else "48" for a in TINY]
    with pytest.raises(SystemExit, match=r"step 2 .*\(width: saved 32, now 48\)"):
        gpt.main([*wider, *out, "--resume"])
    # the run configuration includes the optimizer state's bits
    with pytest.raises(SystemExit, match=r"\(state_bits: saved None, now 8\)"):
        gpt.main([*TINY, *out, "--state-bits", "8", "--resume"])


def test_gpt_state_bits_8_quantizes_every_matrix(examples):
    """--state-bits 8: AdamW's two moments of every matrix are 8-bit (checked
    on shapes; the default run's losses are in docs/low_precision.md)."""
    import equinox as eqx
    import jax

    import shardopt

    gpt = examples[0]
    cfg = gpt.config_of(gpt.parse_args(["--state-bits", "8"]))
    assert cfg.state_bits == 8
    model = eqx.filter_eval_shape(gpt.GPT, cfg, jax.random.key(0))
    params = eqx.filter(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    state = jax.eval_shape(gpt.make_transform(cfg).init, params)
    is_q = lambda x: isinstance(x, shardopt.QuantizedArray)
    quantized = [x for x in jax.tree.leaves(state, is_leaf=is_q) if is_q(x)]
    matrices = [x for x in jax.tree.leaves(params) if x.ndim == 2]
    assert len(matrices) == 11  # embed, position, head, 4 per block x 2
    assert len(quantized) == 2 * len(matrices)
    assert {q.codes.dtype.name for q in quantized} == {"uint8"}


def test_restore_on_new_mesh_continues_with_equal_numbers(examples, tmp_path, capsys):
    restore = examples[1]
    result = restore.main([*TINY, "--no-plots", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert result["restored_equal"] and result["continued_equal"]
    assert len(result["reference"]) == len(result["continued"]) == 6
    assert result["continued"][:3] == result["reference"][:3]
    assert "moments P('data', None) over 8 devices" in printed
    assert "on 4 devices at ZeRO-1: moments P('data', None) over 4 devices" in printed
