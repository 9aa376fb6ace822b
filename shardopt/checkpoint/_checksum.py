"""Checksums of every shard, taken in Orbax's background thread, checked on read.

Each process records, for every shard it holds the first copy of, the shard's
slice of the global array and the CRC-32 of its bytes (row-major). A reader
recomputes the checksum of each recorded slice, so the check works whatever
mesh the array is later read onto. zlib's CRC-32 is hardware-accelerated
(measured here: ~4 GB/s a core, Adler-32 ~1.4 GB/s) and releases the GIL; it
detects truncation and flipped bytes, not deliberate tampering. Checkpoints
written before recorded Adler-32 (``"adler32"`` in each record) and are still
checked with it.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

Record = dict  # {"leaf": int, "index": [[start, stop], ...], "crc32": int | None}
ALGORITHMS = {"crc32": zlib.crc32, "adler32": zlib.adler32}
INITIAL = {"crc32": 0, "adler32": 1}  # the value of no bytes


def digest(x: np.ndarray, algorithm: str = "crc32", running: int | None = None) -> int:
    """The checksum of an array's bytes in row-major order.

    ``running``: the checksum of the bytes before ``x``, to chain pieces (the
    checksum of ``a`` then ``b`` is ``digest(b, running=digest(a))``). Viewed
    as raw bytes first: the buffer protocol has no format for ml_dtypes'
    bfloat16 and float8 types.
    """
    start = INITIAL[algorithm] if running is None else running
    return ALGORITHMS[algorithm](
        np.ascontiguousarray(x).reshape(-1).view(np.uint8), start
    )


def recorded(record: Record) -> tuple[str, int | None]:
    """``(algorithm, value)`` of a record, new (CRC-32) or old (Adler-32)."""
    if "crc32" in record:
        return "crc32", record["crc32"]
    return "adler32", record.get("adler32")


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
            value = digest(np.asarray(data))
        except RuntimeError:  # deleted or donated in the meantime
            value = None
        records.append({"leaf": leaf, "index": index, "crc32": value})
    return records


def check(array: np.ndarray, records: list[Record]) -> str | None:
    """``None`` if every recorded shard of ``array`` matches, else why not."""
    for record in records:
        algorithm, value = recorded(record)
        if value is None:
            continue
        region = tuple(slice(a, b) for a, b in record["index"])
        if digest(array[region], algorithm) != value:
            where = ",".join(f"{a}:{b}" for a, b in record["index"])
            return f"checksum mismatch in [{where}]"
    return None
