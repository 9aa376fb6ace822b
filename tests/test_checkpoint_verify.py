"""The verified restore: every shard checked as it is read, what the reader
could not hand over checked after the read."""

from __future__ import annotations

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import xxhash
from _ckpt_helpers import damage
from orbax.checkpoint._src.serialization import serialization

from shardopt.checkpoint import (
    CheckpointError,
    CheckpointManager,
    ChecksumError,
    CorruptCheckpointError,
    _array_read,
    _reads,
    _verify,
)


def test_orbax_shard_reads_are_hooked_and_tell_no_one_else(tmp_path, monkeypatch):
    """The per-shard read of this Orbax is wrapped (an Orbax without one would
    leave every check for after the read: this fails first); a plain Orbax
    restore in the same process hands nothing to a shardopt check."""
    assert _reads.HOOKED and serialization._read_shard.shardopt_hook
    assert serialization.async_deserialize.shardopt_hook
    told, shard = [], _verify.Verifier.shard

    def spy(self, name, bounds, data):
        told.append(data.shape)
        return shard(self, name, bounds, data)

    monkeypatch.setattr(_verify.Verifier, "shard", spy)
    tree = {"w": jnp.arange(64.0)}
    with CheckpointManager(tmp_path / "shardopt") as ckpt:
        ckpt.save(1, params=tree)
    CheckpointManager(tmp_path / "shardopt").restore(params=tree)
    assert told == [(64,)]  # the shardopt restore's one shard
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "plain", tree)
        ckptr.wait_until_finished()
        got = ckptr.restore(tmp_path / "plain", tree)
    assert np.array_equal(got["w"], tree["w"]) and told == [(64,)]
    assert _reads._READ.get() is None


class _CountingJax:
    """``jax`` with its ``device_put`` calls counted (by the number of arrays
    each placed), and the arrays it copied instead of taking the host buffer
    as it is: what ``_array_read`` sees as ``jax``."""

    def __init__(self) -> None:
        self.placed: list[int] = []
        self.copied = 0

    def __getattr__(self, name):
        return getattr(jax, name)

    def device_put(self, arrays, places):
        self.placed.append(len(arrays))
        out = jax.block_until_ready(jax.device_put(arrays, places))
        self.copied += sum(
            x.size > 0 and y.unsafe_buffer_pointer() != x.ctypes.data
            for x, y in zip(arrays, out, strict=True)
        )
        return out


@pytest.mark.parametrize("limit", [None, 2048])
def test_a_restore_places_each_array_with_one_call(tmp_path, monkeypatch, limit):
    """Each array's shards, replicated copies included, are placed with one
    batched device_put, read bitwise into buffers that the CPU devices take
    as they are (no copy after the read): sharded, replicated, partly
    replicated on a 2-D mesh, onto another mesh, scalar, zero-size, bfloat16.
    Under a limit on bytes in flight (2 KiB) that one array's shards exceed
    together (3 KiB), that array is read by Orbax's own function, shard by
    shard, and the rest are not. Either way the check is given every array's
    shards as they are read. A plain Orbax restore is Orbax's."""
    from orbax.checkpoint._src.serialization import limits

    assert _reads.LEAN and serialization._read_and_create_array.shardopt_hook
    devices = np.array(jax.devices()[:8])
    line = jax.sharding.Mesh(devices, ("x",))
    grid = jax.sharding.Mesh(devices.reshape(4, 2), ("x", "y"))

    def on(mesh, *spec):
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    rows = jnp.arange(64.0 * 6).reshape(64, 6)  # 1.5 KiB
    tree = {
        "sharded": jax.device_put(rows, on(line, "x")),
        "replicated": jax.device_put(rows + 1, on(line)),
        "half": jax.device_put(rows + 2, on(grid, "x")),  # 4 shards, 2 copies each
        "scalar": jax.device_put(jnp.float32(3.0), on(line)),
        "empty": jax.device_put(jnp.zeros((0, 3)), on(line, "x")),
        "bf16": jax.device_put(rows.astype(jnp.bfloat16), on(line, None, None)),
        "big": jax.device_put(jnp.tile(rows, 2), on(line, "x")),  # 3 KiB
    }
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, params=tree)
    if limit is not None:
        make = limits.get_byte_limiter
        monkeypatch.setattr(limits, "get_byte_limiter", lambda n=None: make(limit))
    told, shard = set(), _verify.Verifier.shard

    def spy(self, name, bounds, data):  # the check is given every array
        told.add(name)
        return shard(self, name, bounds, data)

    monkeypatch.setattr(_verify.Verifier, "shard", spy)
    onto_y = {k: on(grid, "y") if v.ndim else on(grid) for k, v in tree.items()}
    for target in (tree, jax.tree.map(jax.device_put, tree, onto_y)):
        counting = _CountingJax()
        monkeypatch.setattr(_array_read, "jax", counting)
        told.clear()
        got = CheckpointManager(tmp_path).restore(params=target).params
        assert told == {f"params/{k}" for k in tree if k != "empty"}
        for name, want in target.items():
            assert got[name].sharding == want.sharding, name
            assert got[name].dtype == want.dtype, name
            assert np.array_equal(np.asarray(got[name]), np.asarray(want)), name
        placed = {k: len(x.sharding.addressable_devices) for k, x in target.items()}
        del placed["empty"]  # made from the record: Orbax cannot write it
        if limit is not None:
            del placed["big"]  # read by Orbax's own, shard by shard
        assert sorted(counting.placed) == sorted(placed.values())
        assert counting.copied == 0
    counting = _CountingJax()
    monkeypatch.setattr(_array_read, "jax", counting)
    plain = {k: v for k, v in tree.items() if k != "empty"}  # Orbax refuses it
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "plain", plain)
        ckptr.wait_until_finished()
        got = ckptr.restore(tmp_path / "plain", plain)
    assert counting.placed == []
    assert np.array_equal(got["sharded"], tree["sharded"])


def test_restored_buffers_shared_by_devices_survive_a_donated_step(tmp_path):
    """On CPU the 8 devices of a replicated restored array share the read's
    one buffer: a step that donates it writes each device's output into a
    buffer of its own, and every device gets the right result (were the
    shared buffer written in place, the devices after the first would read
    a result as their input)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = {"w": jax.device_put(jnp.arange(4096.0).reshape(64, 64), replicated)}
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, params=params)
    got = CheckpointManager(tmp_path).restore(params=params).params["w"]
    pointers = {s.data.unsafe_buffer_pointer() for s in got.addressable_shards}
    assert len(pointers) == 1  # one host buffer for the 8 devices
    step = jax.jit(lambda w: w * 2 + 1, donate_argnums=0, out_shardings=replicated)
    out = jax.block_until_ready(step(got))
    want = np.arange(4096.0).reshape(64, 64) * 2 + 1
    for shard in out.addressable_shards:
        assert shard.data.unsafe_buffer_pointer() not in pointers
        assert np.array_equal(np.asarray(shard.data), want)


@pytest.mark.parametrize("checked", ["as read", "after the read", "not (verify=False)"])
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damage_is_caught_among_ten_arrays(tmp_path, monkeypatch, how, checked):
    """Ten arrays, one in 8 shards, checked as they are read, after (a reader
    that hands nothing over) or not at all: the damaged one is named, the restore raises
    (nothing half-returned; a short file is caught by the read itself, and
    no other array's read is left running), fallback restores the step
    before. Without the check a flipped byte is read as it is."""
    params = {f"small{i}": jnp.arange(64.0) + i for i in range(9)}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))
    # in 8 shards: a short file fails some of them, and none of the reads
    # of the others (of this array and the rest) may outlive the restore
    params["big"] = jax.device_put(
        jnp.arange(16384.0).reshape(128, 128),
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")),
    )
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, params=params)
        ckpt.save(2, params={k: v + 1 for k, v in params.items()})
    if checked == "after the read":
        monkeypatch.setattr(_verify.Verifier, "shard", lambda *a: None)
    verify = False if checked == "not (verify=False)" else None

    def only_big_differs():  # the flip hit big's values, nothing else
        try:
            got = CheckpointManager(tmp_path).restore(2, params=params, verify=False)
        except CheckpointError:
            return False
        differ = [
            k for k, v in params.items() if not np.array_equal(got.params[k], v + 1)
        ]
        return differ == ["big"]

    damaged = damage(tmp_path / "2", how, only_big_differs)
    if how == "flip" and verify is False:
        got = CheckpointManager(tmp_path).restore(params=params, verify=False)
        assert got.step == 2 and not np.array_equal(
            got.params["big"], params["big"] + 1
        )
        return
    with pytest.raises(CorruptCheckpointError) as err:
        CheckpointManager(tmp_path).restore(params=params, verify=verify)
    message = str(err.value)
    assert "step 2" in message and "params/big" in message, message
    if how == "truncate":
        assert "truncated" in message and damaged in message, message
    else:
        assert isinstance(err.value, ChecksumError)
        assert "1 array(s) differ" in message, message
    got = CheckpointManager(tmp_path).restore(
        params=params, fallback=True, verify=verify
    )
    assert got.step == 1
    assert all(np.array_equal(got.params[k], v) for k, v in params.items())


def _shards(array, cuts0, cuts1):
    """The distinct-shard list ``_region_digest`` takes: a grid of blocks."""
    out = []
    for a, b in itertools.pairwise(cuts0):
        for c, d in itertools.pairwise(cuts1):
            out.append(([[a, b], [c, d]], array[a:b, c:d]))
    return out


@pytest.mark.parametrize(
    ("cuts0", "cuts1"),
    [([0, 64], [0, 48]), ([0, 16, 40, 64], [0, 48]), ([0, 32, 64], [0, 20, 48])],
)
def test_region_checksum_chained_over_bands_equals_the_whole(monkeypatch, cuts0, cuts1):
    """Row bands in place, column-split bands put together, bands cut small:
    the chained XXH3 (and CRC-32, Adler-32) is that of the region's bytes."""
    from shardopt.checkpoint import _verify

    monkeypatch.setattr(_verify, "BAND_BYTES", 5 * 48 * 4)  # 5 rows a band
    array = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    shards = _shards(array, cuts0, cuts1)

    def data(i):
        return shards[i][1]

    for region in ([[0, 64], [0, 48]], [[8, 59], [0, 48]], [[3, 50], [10, 40]]):
        part = array[tuple(slice(a, b) for a, b in region)]
        for algorithm, fn in (
            ("xxh3_64", xxhash.xxh3_64_intdigest),
            ("crc32", zlib.crc32),
            ("adler32", zlib.adler32),
        ):
            got = _verify._region_digest(region, shards, data, np.float32, algorithm)
            assert got == fn(np.ascontiguousarray(part).view(np.uint8))
    if len(shards) > 1:  # one block not local: left to the process holding it
        rest = shards[1:]
        got = _verify._region_digest(
            [[0, 64], [0, 48]], rest, lambda i: rest[i][1], np.float32, "xxh3_64"
        )
        assert got is None


def test_a_failing_check_is_not_reported_as_a_damaged_file(tmp_path, monkeypatch):
    """The check runs inside Orbax's read, where any error would come out as
    a damaged file: its own failure is raised after the read, as itself."""
    params = {"w": jnp.arange(64.0)}
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, params=params)

    def fails(self, bounds, data):
        raise MemoryError("no room to check")

    monkeypatch.setattr(_verify._LeafCheck, "shard", fails)
    with pytest.raises(MemoryError, match="no room to check"):
        CheckpointManager(tmp_path).restore(params=params)
