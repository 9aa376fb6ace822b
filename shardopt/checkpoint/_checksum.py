"""Checksums of every shard, taken in Orbax's background thread, checked on read.

Each process records, for every shard it holds the first copy of, the shard's
slice of the global array and the Adler-32 of its bytes (row-major). A reader
with the whole array recomputes the checksum of each recorded slice, so the
check works whatever mesh the array is later read onto. Adler-32 runs at
memory speed and releases the GIL; it detects truncation and flipped bytes,
not deliberate tampering.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

Record = dict  # {"leaf": int, "index": [[start, stop], ...], "adler32": int | None}


def adler32(x: np.ndarray) -> int:
    """Adler-32 of an array's bytes in row-major order.

    Viewed as raw bytes first: the buffer protocol has no format for
    ml_dtypes' bfloat16 and float8 types.
    """
    return zlib.adler32(np.ascontiguousarray(x).reshape(-1).view(np.uint8))


def _slices(index: tuple, shape: tuple[int, ...]) -> list[list[int]]:
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, _ = s.indices(n) if isinstance(s, slice) else (s, s + 1, 1)
        out.append([int(start), int(stop)])
    return out


def collect(leaves: list[jax.Array]) -> list[tuple[int, list, jax.Array]]:
    """The shards this process checksums: ``(leaf, slices, shard data)``.

    Cheap: nothing is read until :func:`compute`, which Orbax's background
    thread runs before the step is committed.
    """
    out = []
    for i, leaf in enumerate(leaves):
        for shard in leaf.addressable_shards:
            if shard.replica_id == 0:
                out.append((i, _slices(shard.index, leaf.shape), shard.data))
    return out


def compute(shards: list[tuple[int, list, jax.Array]]) -> list[Record]:
    """Read each shard to the host and checksum it.

    A shard whose array was deleted (donated to a jitted step) before it could
    be read gets ``None``: ``verify`` reports it as not recorded.
    """
    records = []
    for leaf, index, data in shards:
        try:
            value = adler32(np.asarray(data))
        except RuntimeError:  # deleted or donated in the meantime
            value = None
        records.append({"leaf": leaf, "index": index, "adler32": value})
    return records


def check(array: np.ndarray, records: list[Record]) -> str | None:
    """``None`` if every recorded shard of ``array`` matches, else why not."""
    for record in records:
        if record["adler32"] is None:
            continue
        region = tuple(slice(a, b) for a, b in record["index"])
        if adler32(array[region]) != record["adler32"]:
            where = ",".join(f"{a}:{b}" for a, b in record["index"])
            return f"checksum mismatch in [{where}]"
    return None
