"""The verified restore: one concurrent read in groups, each group checked once read."""

from __future__ import annotations

import asyncio
import itertools
import os
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
import xxhash

from shardopt.checkpoint import (
    CheckpointManager,
    ChecksumError,
    CorruptCheckpointError,
    _handler,
)


def test_groups_split_consecutive_arrays_by_bytes():
    assert _handler._groups([4, 4, 4, 4], 4) == [[0], [1], [2], [3]]
    assert _handler._groups([4, 4, 4, 4], 2) == [[0, 1], [2, 3]]
    assert _handler._groups([13, 1, 1, 1], 2) == [[0], [1, 2, 3]]
    assert _handler._groups([1] * 7 + [13], 4) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert _handler._groups([1, 1], 8) == [[0], [1]]
    assert _handler._groups([], 4) == []


def test_all_or_none_cancels_the_rest_on_the_first_failure():
    cancelled = []

    async def waits(i):
        try:
            await asyncio.Event().wait()  # never set: only cancellation ends it
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    async def fails():
        await asyncio.sleep(0)
        raise OSError("short read")

    async def ok(i):
        await asyncio.sleep(0)
        return i

    assert asyncio.run(_handler._all_or_none([ok(i) for i in range(3)])) == [0, 1, 2]
    with pytest.raises(OSError, match="short read"):
        asyncio.run(_handler._all_or_none([waits(0), fails(), waits(2)]))
    assert sorted(cancelled) == [0, 2]


def _damage(directory, how):
    """Truncate or flip a byte in the middle of the largest array data file."""
    found = []
    for root, _, files in os.walk(directory):
        if os.sep + "d" in root and "arrays" in root:
            found += [os.path.join(root, f) for f in files]
    (name,) = sorted(found, key=os.path.getsize)[-1:]
    with open(name, "r+b") as f:
        if how == "truncate":
            f.truncate(os.path.getsize(name) // 2)
        else:
            f.seek(os.path.getsize(name) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    return os.path.basename(name)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damage_is_caught_with_arrays_in_several_groups(tmp_path, how):
    """Ten arrays read in concurrent groups: the damaged one is named, the
    restore raises (nothing half-returned), fallback restores the step before."""
    # Orbax reads the leaves in key order: "big" first, alone in its group
    params = {f"small{i}": jnp.arange(64.0) + i for i in range(9)}
    params["big"] = jnp.arange(16384.0).reshape(128, 128)
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, params=params)
        ckpt.save(2, params={k: v + 1 for k, v in params.items()})
    sizes = [params[k].nbytes for k in sorted(params)]
    assert len(_handler._groups(sizes, _handler.ReadHookArrayHandler.GROUPS)) > 1
    damaged = _damage(tmp_path / "2", how)
    with pytest.raises(CorruptCheckpointError) as err:
        CheckpointManager(tmp_path).restore(params=params)
    message = str(err.value)
    assert "step 2" in message and "params/big" in message, message
    if how == "truncate":
        assert "truncated" in message and damaged in message, message
    else:
        assert isinstance(err.value, ChecksumError)
        assert "1 array(s) differ" in message, message
    got = CheckpointManager(tmp_path).restore(params=params, fallback=True)
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
