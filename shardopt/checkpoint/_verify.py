"""Checking what a restore read against the checksums recorded at save.

Every restore does it by default. Each process checks only the shards it holds
(one local copy of each distinct slice: Orbax reads a slice once and places it
on every local device that holds it), so the cost is one hashing pass (XXH3,
see ``_checksum``) over the bytes this process read. The pass overlaps the
read: Orbax's reader reads the arrays in a few groups at once and hands each
group over as soon as it is read (``ReadHookArrayHandler``); its checks run in
a thread pool (the hash releases the GIL) while the other groups are still
being read. A recorded slice that no single local shard contains (the array
was saved in another layout) is checked from the local shards band by band,
the hash chained, when the process has all of it; on several processes such a
slice is left to the processes whose shards contain it.

Damaged files are named: a short read names the OCDBT key and, from the size
TensorStore reports, the data file that is too short; a checksum mismatch names
the leaf, its item and the data files of the item.
"""

from __future__ import annotations

import concurrent.futures
import glob
import itertools
import math
import os
import re
import threading

import numpy as np

from ._checksum import as_bytes, digest, hasher, recorded
from ._errors import ChecksumError, CorruptCheckpointError
from ._tree import nested_paths

_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="shardopt_verify"
)


def _contains(shard_index: list[list[int]], region: list[list[int]]) -> bool:
    return all(
        a <= b and d <= c for (a, c), (b, d) in zip(shard_index, region, strict=True)
    )


def _shard_bounds(index: tuple, shape: tuple[int, ...]) -> list[list[int]]:
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, _ = s.indices(n)
        out.append([start, stop])
    return out


def _key(bounds: list[list[int]]) -> tuple:
    return tuple(tuple(pair) for pair in bounds)


def _check_leaf(leaf, records: list[dict]) -> str | None:
    """``None`` if every recorded slice this process can see matches, else why."""
    records = [r for r in records if recorded(r)[1] is not None]
    if not records:
        return None
    # one local copy of each distinct slice: every slice this process read is
    # checked (a replica too), its other local copies come from the same read
    distinct: dict[tuple, tuple] = {}
    for s in leaf.addressable_shards:
        bounds = _shard_bounds(s.index, leaf.shape)
        distinct.setdefault(_key(bounds), (bounds, s))
    shards = list(distinct.values())
    host: dict[int, np.ndarray] = {}

    def data(i: int) -> np.ndarray:
        if i not in host:
            host[i] = np.asarray(shards[i][1].data)
        return host[i]

    exact = {_key(bounds): i for i, (bounds, _) in enumerate(shards)}
    for record in records:
        region = record["index"]
        i = exact.get(_key(region))
        if i is not None:  # a slice saved as it was read: no slicing
            part = data(i)
        else:
            for i, (bounds, _) in enumerate(shards):
                if _contains(bounds, region):
                    local = tuple(
                        slice(a - o, b - o)
                        for (a, b), (o, _) in zip(region, bounds, strict=True)
                    )
                    part = data(i)[local]
                    break
            else:  # saved in another layout: from the shards, band by band
                part = None
        algorithm, value = recorded(record)
        if part is not None:
            got = digest(part, algorithm)
        else:
            got = _region_digest(region, shards, data, leaf.dtype, algorithm)
            if got is None:
                continue  # partly on another process, which checks its part
        if got != value:
            where = ",".join(f"{a}:{b}" for a, b in region)
            return f"checksum mismatch in [{where}]"
    return None


BAND_BYTES = 1 << 20  # small enough to be in cache still when checksummed


def _region_digest(region, shards, data, dtype, algorithm) -> int | None:
    """The checksum of ``region`` from the local shards; None if not all local.

    The first copies of the shards tile the array, so the region is local
    exactly when the overlaps add up to its size. Its row-major bytes are
    its bands along the first axis one after another, so the checksum is
    chained over bands cut at the shards' boundaries and at ~``BAND_BYTES``:
    a band inside one shard is checksummed where it lies (no copy when that
    shard spans the region's other axes), a band split over shards is put
    together first, in a buffer reused for every band (still in cache when
    the checksum reads it). The overlaps are worked out once per region.
    """
    if not region:  # a scalar: every shard holds it
        return digest(data(0), algorithm) if shards else None
    parts = []  # (shard, its first-axis offset, first-axis overlap, other axes)
    covered = 0
    for i, (bounds, _) in enumerate(shards):
        lo = [max(a, c) for (a, _), (c, _) in zip(region, bounds, strict=True)]
        hi = [min(b, d) for (_, b), (_, d) in zip(region, bounds, strict=True)]
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            continue
        covered += math.prod(h - low for low, h in zip(lo, hi, strict=True))
        src = tuple(
            slice(low - c, h - c)
            for low, h, (c, _) in zip(lo[1:], hi[1:], bounds[1:], strict=True)
        )
        dst = tuple(
            slice(low - a, h - a)
            for low, h, (a, _) in zip(lo[1:], hi[1:], region[1:], strict=True)
        )
        parts.append((i, bounds[0][0], (lo[0], hi[0]), src, dst))
    sizes = [b - a for a, b in region]
    if covered != math.prod(sizes):
        return None
    inner = math.prod(sizes[1:])
    rows = max(1, BAND_BYTES // max(inner * np.dtype(dtype).itemsize, 1))
    cuts = {region[0][0], region[0][1]}
    cuts.update(c for _, _, pair, _, _ in parts for c in pair)
    running, scratch = hasher(algorithm), None
    for start, stop in itertools.pairwise(sorted(cuts)):
        here = [p for p in parts if p[2][0] <= start and stop <= p[2][1]]
        if len(here) == 1:  # one shard holds these rows: hashed where they lie
            i, offset, _, src, _ = here[0]
            for a in range(start, stop, rows):
                band = (slice(a - offset, min(a + rows, stop) - offset), *src)
                running.update(as_bytes(data(i)[band]))
            continue
        if scratch is None:
            scratch = np.empty(rows * inner, dtype)
        for a in range(start, stop, rows):
            b = min(a + rows, stop)
            out = scratch[: (b - a) * inner].reshape(b - a, *sizes[1:])
            for i, offset, _, src, dst in here:
                out[(slice(None), *dst)] = data(i)[
                    (slice(a - offset, b - offset), *src)
                ]
            running.update(as_bytes(out))
    return running.intdigest()


def data_files(directory: str, step: int, item: str) -> list[str]:
    """The files holding array bytes of ``item`` (largest first)."""
    root = os.path.join(directory, str(step), item)
    found = glob.glob(os.path.join(root, "d", "*")) + glob.glob(
        os.path.join(root, "ocdbt.process_*", "d", "*")
    )
    return sorted(found, key=lambda p: -os.path.getsize(p))


class Verifier:
    """Checks the arrays of one restore against the checksums, as they arrive.

    :meth:`submit` queues a leaf's check in the thread pool; the restore calls
    it from Orbax's reading loop as soon as each group of arrays is read (see
    ``ReadHookArrayHandler``), so checking overlaps reading. :meth:`finish`
    then checks every leaf of the restored tree that was not submitted, or
    not as the very object that ends up in the tree, waits for all, and raises
    :class:`ChecksumError` naming the leaves that differ.
    """

    def __init__(
        self, step: int, directory: str, item_dir: str, meta: dict, records: list
    ):
        self.step, self.directory, self.item_dir = step, directory, item_dir
        by_leaf: dict[int, list] = {}
        for record in records:
            by_leaf.setdefault(record["leaf"], []).append(record)
        self._records = {
            name: by_leaf[i]
            for i, name in enumerate(meta["checksum_order"])
            if by_leaf.get(i)
        }
        self._jobs: dict[str, tuple[object, concurrent.futures.Future]] = {}
        self._lock = threading.Lock()

    def submit(self, name: str, leaf) -> None:
        """Start checking the leaf ``name`` ("item/path") in the thread pool."""
        records = self._records.get(name)
        if records is None:
            return
        with self._lock:
            self._jobs[name] = (leaf, _POOL.submit(_check_leaf, leaf, records))

    def finish(self, got: dict) -> None:
        """Check what was not yet, wait, raise if any leaf differs."""
        for item, tree in got.items():
            for path, leaf in nested_paths(tree).items():
                name = f"{item}/{path}"
                job = self._jobs.get(name)
                if job is None or job[0] is not leaf:
                    self.submit(name, leaf)
        names = [f"{i}/{p}" for i, tree in got.items() for p in nested_paths(tree)]
        bad = [(n, self._jobs[n][1].result()) for n in names if n in self._jobs]
        bad = [(name, problem) for name, problem in bad if problem]
        if bad:
            files = data_files(self.directory, self.step, self.item_dir)
            shown = ", ".join(os.path.relpath(f, self.directory) for f in files[:3])
            more = f" and {len(files) - 3} more" if len(files) > 3 else ""
            leaves = ", ".join(f"{name} ({problem})" for name, problem in bad[:20])
            raise ChecksumError(
                f"step {self.step} in {self.directory} is corrupted: {len(bad)} "
                f"array(s) differ from what was saved: {leaves}; the bytes are in "
                f"{os.path.join(str(self.step), self.item_dir)} (files {shown}{more})"
            )


_KEY = re.compile(r'Error reading "([^"]+)"')
_FILE = re.compile(r'local file "([^"]+)"')
_SIZES = re.compile(r"byte range \[\d+, (\d+)\) is not valid for value of size (\d+)")


def read_error(
    err: BaseException, step: int, directory: str, item_dir: str
) -> CorruptCheckpointError | None:
    """Orbax's error on reading a damaged file, as one that names the file.

    ``None`` when ``err`` does not look like a damaged file.
    """
    chain, e = [], err
    while e is not None and len(chain) < 10:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(chain)
    key = _KEY.search(text)
    if key is None and "reading array" not in text:
        return None
    leaf = ""
    if key is not None:
        # OCDBT keys are "<item>.<path with dots>/<chunk>"
        leaf = key.group(1).split("/")[0].replace(".", "/", 1)
    files = data_files(directory, step, item_dir)
    sizes = _SIZES.search(text)
    culprit = ""
    if sizes is not None:
        short = [f for f in files if os.path.getsize(f) == int(sizes.group(2))]
        if short:
            culprit = (
                f"; the file {os.path.relpath(short[0], directory)} is "
                f"{sizes.group(2)} bytes, shorter than the {sizes.group(1)} "
                "bytes recorded (truncated)"
            )
    named = _FILE.findall(text)
    if not culprit and named and os.path.isfile(named[-1]):
        culprit = f"; the file {os.path.relpath(named[-1], directory)} is damaged"
    if not culprit:
        culprit = f"; the bytes are in {os.path.join(str(step), item_dir)}"
    what = f" the array {leaf}" if leaf else " an array"
    return CorruptCheckpointError(
        f"step {step} in {directory} is corrupted: reading{what} failed "
        f"({_last_line(chain)}){culprit}"
    )


def _last_line(chain: list[str]) -> str:
    text = chain[-1].split(" [tensorstore_spec")[0].strip().splitlines()
    return text[0] if text else "unknown error"
