"""Save and restore through shardopt.checkpoint: meshes, partial restores, bad input."""

from __future__ import annotations

import json
import os
import zlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _ckpt_helpers import (
    abstract,
    array_files,
    arrays_equal,
    damage,
    mesh,
    model,
    replicate,
    trained,
    zero1,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardopt
from shardopt.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ChecksumError,
    CorruptCheckpointError,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Step 5 saved from ZeRO-1 on 8 devices, with extras."""
    directory = tmp_path_factory.mktemp("ckpt")
    m8 = mesh(8)
    params, opt = trained()
    params, opt = replicate(params, m8), zero1(opt, m8)
    key = jax.random.key(42)
    with CheckpointManager(directory) as ckpt:
        ckpt.save(
            5,
            params=params,
            opt=opt,
            rng=key,
            data={"epoch": 1, "batch": 120},
            metadata={"run": "test"},
        )
    return directory, params, opt, key


def abstract_opt(transform=None):
    params = eqx.filter_eval_shape(model)
    return shardopt.Optimizer(transform or shardopt.adamw(1e-2), params)


def test_round_trip_with_extras(saved):
    directory, params, opt, key = saved
    ckpt = CheckpointManager(directory)
    assert ckpt.all_steps() == [5] and ckpt.latest_step() == 5
    got = ckpt.restore(params=params, opt=opt)
    assert got.step == 5
    assert arrays_equal(got.params, params) and arrays_equal(got.opt, opt)
    assert got.opt.transform.transforms[2].flip_sign is True  # non-array leaf kept
    assert jnp.array_equal(jax.random.key_data(got.rng), jax.random.key_data(key))
    assert got.data == {"epoch": 1, "batch": 120}
    assert got.metadata == {"run": "test"}
    # the restored model still runs (its activation came from the target)
    assert got.params(jnp.ones(8)).shape == (8,)
    ckpt.close()


@pytest.mark.parametrize(
    "name",
    ["stage3_on_4_devices", "stage0_on_1_device", "mesh_4x2_model_axis", "explicit"],
)
def test_restore_onto_other_layouts(saved, name):
    directory, params, opt, _ = saved
    if name == "stage3_on_4_devices":
        m = mesh(4)
        spec = lambda x: NamedSharding(m, P("data") if x.ndim else P())
        like_params = abstract(params, spec)
    elif name == "stage0_on_1_device":
        m = mesh(1)
        spec = lambda x: NamedSharding(m, P())
        like_params = abstract(params, spec)
    elif name == "mesh_4x2_model_axis":
        m = mesh(8, (4, 2), ("data", "model"))
        spec = lambda x: NamedSharding(
            m, P("data", "model") if x.ndim == 2 else P("data") if x.ndim else P()
        )
        like_params = abstract(params, spec)
    else:
        m = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
        spec = lambda x: NamedSharding(m, P("data") if x.ndim else P())
        like_params = abstract(params, spec)
    like_opt = abstract(abstract_opt(), spec)
    got = CheckpointManager(directory).restore(params=like_params, opt=like_opt)
    assert arrays_equal(got.params, params) and arrays_equal(got.opt, opt)
    for x, want in zip(
        jax.tree.leaves(eqx.filter(got.opt.state, eqx.is_array)),
        jax.tree.leaves(eqx.filter(like_opt.state, lambda x: hasattr(x, "sharding"))),
        strict=True,
    ):
        assert x.sharding == want.sharding
    # counts and hyperparameters come back replicated on the target's mesh
    assert got.opt.count.sharding == NamedSharding(m, P())
    # and the restored optimizer steps on
    grads = jax.tree.map(
        lambda x: jnp.ones_like(x) if eqx.is_array(x) else None, got.params
    )
    _, stepped = got.opt.step(got.params, grads)
    assert int(stepped.count) == int(opt.count) + 1


def test_params_only(saved):
    directory, params, _, _ = saved
    got = CheckpointManager(directory).restore(params=eqx.filter_eval_shape(model))
    assert got.opt is None
    assert arrays_equal(got.params, params)
    assert got.params.layers[0].weight.sharding.device_set == {jax.devices()[0]}


def test_new_learning_rate_keeps_moments(saved):
    directory, _, opt, _ = saved
    target = abstract_opt(shardopt.adamw(1e-4))
    got = CheckpointManager(directory).restore(opt=target, keep_hyperparameters=True)
    assert arrays_equal(got.opt.state, opt.state)
    assert float(got.opt.hyperparameters()["learning_rate"]) == pytest.approx(1e-4)
    # without keep_hyperparameters the saved learning rate comes back
    got = CheckpointManager(directory).restore(opt=target)
    assert float(got.opt.hyperparameters()["learning_rate"]) == pytest.approx(1e-2)


def test_schedule_keeps_moments_and_hint(saved):
    directory, _, opt, _ = saved
    schedule = shardopt.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)
    target = abstract_opt(shardopt.adamw(schedule))
    with pytest.raises(CheckpointMismatchError, match="keep_hyperparameters=True"):
        CheckpointManager(directory).restore(opt=target)
    got = CheckpointManager(directory).restore(opt=target, keep_hyperparameters=True)
    assert arrays_equal(got.opt.state, opt.state)
    assert isinstance(
        got.opt.hyperparameters()["learning_rate"], shardopt.AbstractSchedule
    )


def test_other_model_lists_paths(saved):
    directory, _, _, _ = saved
    other = eqx.nn.MLP(8, 4, 16, 2, key=jax.random.key(1))
    with pytest.raises(CheckpointMismatchError) as err:
        CheckpointManager(directory).restore(params=other)
    message = str(err.value)
    assert "layers/2/weight: saved float32[8,16], target float32[4,16]" in message
    assert "layers/2/bias" in message
    deeper = eqx.nn.MLP(8, 8, 16, 3, key=jax.random.key(1))
    with pytest.raises(
        CheckpointMismatchError, match="not in the checkpoint: layers/3"
    ):
        CheckpointManager(directory).restore(params=deeper)


def test_missing_empty_and_bad_step(tmp_path, saved):
    directory, params, _, _ = saved
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory"):
        CheckpointManager(tmp_path / "nope", create=False)
    with pytest.raises(CheckpointNotFoundError, match="holds no fully written step"):
        CheckpointManager(tmp_path / "empty").restore(params=params)
    with pytest.raises(
        CheckpointNotFoundError, match=r"no step 7 .* steps present: \[5\]"
    ):
        CheckpointManager(directory).restore(7, params=params)


def test_max_to_keep_keep_every_and_no_overwrite(tmp_path):
    params = {"w": jnp.arange(8.0)}
    with CheckpointManager(tmp_path, max_to_keep=2, keep_every=4) as ckpt:
        for step in range(1, 10):
            ckpt.save(step, params={"w": params["w"] + step})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 8, 9]
        with pytest.raises(CheckpointError, match="already exists"):
            ckpt.save(9, params={"w": params["w"] * 0})
    got = CheckpointManager(tmp_path).restore(params=params)
    assert got.step == 9 and np.array_equal(got.params["w"], params["w"] + 9)


def test_blocking_save(tmp_path):
    with CheckpointManager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, params={"w": jnp.ones(4)})
        # written before save returns; the writer's lock is held until close
        assert sorted(os.listdir(tmp_path)) == [".shardopt-writer", "1"]
    assert os.listdir(tmp_path) == ["1"]


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupted_array_file(tmp_path, how, caplog):
    params = {"w": jnp.arange(4096.0).reshape(64, 64)}
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, params=params)
        ckpt.save(2, params={"w": params["w"] + 1})

    def w_differs():  # the flip hit w's values
        try:
            got = CheckpointManager(tmp_path).restore(2, params=params, verify=False)
        except CheckpointError:
            return False
        return not np.array_equal(got.params["w"], params["w"] + 1)

    damaged = damage(tmp_path / "2", how, w_differs)
    # the default restore checks every array: both damages are caught, named
    with pytest.raises(CorruptCheckpointError) as err:
        CheckpointManager(tmp_path).restore(params=params)
    message = str(err.value)
    assert "step 2" in message and "params/w" in message, message
    assert "2/arrays" in message and "The newest intact step is 1" in message
    if how == "truncate":
        assert "truncated" in message and damaged in message
    else:
        assert isinstance(err.value, ChecksumError)
    # fallback=True restores step 1 instead, and says so
    with caplog.at_level("WARNING", logger="shardopt.checkpoint"):
        got = CheckpointManager(tmp_path).restore(params=params, fallback=True)
    assert got.step == 1 and np.array_equal(got.params["w"], params["w"])
    assert "Restored step 1 instead" in caplog.text
    if how == "flip":  # verify=False is the explicit opt-out
        got = CheckpointManager(tmp_path).restore(params=params, verify=False)
        assert got.step == 2 and not np.array_equal(got.params["w"], params["w"] + 1)


def test_corrupted_without_intact_step(tmp_path):
    params = {"w": jnp.arange(256.0)}
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, params=params)
    for name in array_files(tmp_path / "1"):
        with open(name, "r+b") as f:
            f.seek(40)
            f.write(b"\xff" * 16)
    with pytest.raises(CorruptCheckpointError, match="No earlier step is intact"):
        CheckpointManager(tmp_path).restore(params=params, fallback=True)


def test_without_checksums(tmp_path):
    params = {"w": jnp.arange(64.0)}
    with CheckpointManager(tmp_path, checksums=False) as ckpt:
        ckpt.save(1, params=params)
    assert "checksums" not in os.listdir(tmp_path / "1")
    got = CheckpointManager(tmp_path).restore(params=params)
    assert np.array_equal(got.params["w"], params["w"])
    with pytest.raises(CheckpointError, match="saved with checksums=False"):
        CheckpointManager(tmp_path).restore(params=params, verify=True)


def test_zero_size_leaves_round_trip(tmp_path):
    """Orbax cannot write arrays without elements: they live in the record."""
    params = {"w": jnp.arange(8.0), "empty": jnp.zeros((8, 0), jnp.bfloat16)}
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, params=params)
        ckpt.save(2, params={"only": jnp.zeros((0,))})
    m = mesh(4)
    like = jax.device_put(params, NamedSharding(m, P()))
    got = CheckpointManager(tmp_path).restore(1, params=like)
    assert arrays_equal(got.params, params)
    assert got.params["empty"].sharding == like["empty"].sharding
    got = CheckpointManager(tmp_path).restore(params={"only": jnp.ones((0,))})
    assert got.params["only"].shape == (0,)


@pytest.mark.parametrize(
    ("algorithm", "function"),
    [("crc32", zlib.crc32), ("adler32", zlib.adler32)],
)
def test_checkpoints_with_older_records_are_still_verified(
    tmp_path, algorithm, function
):
    """Before XXH3, records held CRC-32 (and before that Adler-32): such steps
    restore and are checked with the algorithm they name."""
    params = {"w": jnp.arange(64.0)}
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, params=params)
    (partial,) = (tmp_path / "1" / "checksums").glob("partial_*.json")
    records = json.loads(partial.read_text())
    assert all("xxh3_64" in r for r in records)
    data = np.asarray(params["w"])
    for record in records:
        region = tuple(slice(a, b) for a, b in record["index"])
        record[algorithm] = function(data[region].view(np.uint8))
        del record["xxh3_64"]
    partial.write_text(json.dumps(records))
    got = CheckpointManager(tmp_path).restore(params=params)
    assert np.array_equal(got.params["w"], data)
    records[0][algorithm] += 1
    partial.write_text(json.dumps(records))
    with pytest.raises(ChecksumError, match=r"params/w \(checksum mismatch"):
        CheckpointManager(tmp_path).restore(params=params)


def test_each_shard_is_checked_as_it_is_read_also_onto_another_mesh(
    tmp_path, monkeypatch
):
    """The reader hands every shard to the check as it is read: the slices a
    shard contains are checked there (b's eighths in its halves, s); the rows
    of w saved on 8 devices, split over two (4, 2) column shards, are put
    together from the restored shards after the read, and a flipped byte is
    still caught."""
    from shardopt.checkpoint import _verify

    m8, m42 = mesh(8), mesh(8, (4, 2), ("data", "model"))
    params = {
        "w": jnp.arange(4096.0).reshape(64, 64),
        "b": jnp.arange(64.0),
        "s": jnp.float32(3.0),
    }
    params = {
        k: jax.device_put(v, NamedSharding(m8, P("data") if v.ndim else P()))
        for k, v in params.items()
    }
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, params=params)
    spec = {"w": P("data", "model"), "b": P("model"), "s": P()}
    like = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(m42, spec[k]))
        for k, v in params.items()
    }
    shards, after = [], []
    shard, check_leaf = _verify.Verifier.shard, _verify._check_leaf

    def spy_shard(self, name, bounds, data):
        shards.append((name, bounds))
        shard(self, name, bounds, data)

    def spy_after(leaf, records, *rest):
        after.append([r["index"] for r in records])
        return check_leaf(leaf, records, *rest)

    monkeypatch.setattr(_verify.Verifier, "shard", spy_shard)
    monkeypatch.setattr(_verify, "_check_leaf", spy_after)
    got = CheckpointManager(tmp_path).restore(params=like)
    assert arrays_equal(got.params, params)
    # each distinct shard once: w in 4 x 2 blocks, b in 2 halves, s whole
    assert sorted(shards) == sorted(
        [
            ("params/w", [[r, r + 16], [c, c + 32]])
            for r in range(0, 64, 16)
            for c in (0, 32)
        ]
        + [("params/b", [[0, 32]]), ("params/b", [[32, 64]]), ("params/s", [])]
    )
    assert after == [[[[r, r + 8], [0, 64]] for r in range(0, 64, 8)]]  # w only

    def only_w_differs():  # the flip hit w's values, nothing else
        try:
            got = CheckpointManager(tmp_path).restore(1, params=like, verify=False)
        except CheckpointError:
            return False
        same = {k: np.array_equal(got.params[k], v) for k, v in params.items()}
        return [k for k, equal in same.items() if not equal] == ["w"]

    damage(tmp_path / "1", "flip", only_w_differs)
    with pytest.raises(CorruptCheckpointError, match="params/w"):
        CheckpointManager(tmp_path).restore(params=like)
