"""Checking what a restore read against the checksums recorded at save.

Every restore does it by default. Each process checks only the shards it
reads (each distinct slice is read once and placed on every local device
that holds it), so the cost is one hashing pass (XXH3, see ``_checksum``)
over the bytes this process read. The pass is made in the reading thread:
the reader hands every shard over once TensorStore has read it, before it
is placed on the devices (``_reads``), so the check
reads the host copy the restore already made (on an accelerator, checking
the restored arrays would first copy them back to the host). A recorded
slice that one shard contains is hashed there. A slice split over shards
(saved in another layout) is hashed after the read, from the restored
arrays (on an accelerator, copied back to the host), band by band, the
hash chained; so is every shard the reader could not hand over (one read
with a cast). A slice split between processes is checked by one of the
processes that read part of it, which reads it whole from the files. In a
job of several processes every process raises what any process found, so
that none goes on with the step, or falls back to an earlier one, alone.

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
import zlib
from collections.abc import Callable

import jax
import numpy as np

from ..distributed._multihost import gather_texts
from ._checksum import as_bytes, digest, hasher, recorded
from ._errors import CheckpointError, ChecksumError, CorruptCheckpointError
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


def _check_leaf(
    leaf, records: list[dict], read_whole: Callable[[list], np.ndarray] | None = None
) -> str | None:
    """``None`` if every slice of ``records`` (each with a recorded value) that
    this process is to check matches, else why.

    The check after the read, from the leaf's shards as restored (one local
    copy of each distinct slice: every slice this process read is checked, a
    replica too): each slice that one shard contains, as in the read, then
    the slices split over local shards. A slice split between processes is
    checked by one of the processes that read part of it (``_owner``), which
    reads it whole from the files (``read_whole``).
    """
    distinct: dict[tuple, tuple] = {}
    for s in leaf.addressable_shards:
        bounds = _shard_bounds(s.index, leaf.shape)
        distinct.setdefault(_key(bounds), (bounds, s))
    shards = [(bounds, np.asarray(s.data)) for bounds, s in distinct.values()]
    check = _LeafCheck(records)
    for bounds, data in shards:
        check.shard(bounds, data)
    check.split(shards, leaf.dtype)
    if not check.waiting or read_whole is None:
        return check.problem
    # split between processes: every process's distinct shards, worked out once
    placed = {
        (device.process_index, _key(_shard_bounds(index, leaf.shape)))
        for device, index in leaf.sharding.devices_indices_map(leaf.shape).items()
    }
    for record in check.waiting:
        if _owner(record["index"], placed) == jax.process_index():
            got = digest(read_whole(record["index"]), recorded(record)[0])
            check._compare(record, got)
    return check.problem


def _owner(region: list[list[int]], placed: set[tuple[int, tuple]]) -> int:
    """The process that checks a saved slice split between processes: one of
    those whose shards (``placed``: process and bounds) overlap it, the slices
    spread over them by place (the same choice on every process)."""
    readers = sorted(
        {process for process, bounds in placed if _overlap(region, bounds) is not None}
    )
    return readers[zlib.crc32(repr(region).encode()) % len(readers)]


def _mismatch(region: list[list[int]]) -> str:
    return "checksum mismatch in [" + ",".join(f"{a}:{b}" for a, b in region) + "]"


def _overlap(a: list[list[int]], b: list[list[int]]) -> list[list[int]] | None:
    """The box two boxes ([start, stop) per axis) share; None if empty."""
    out = [[max(p, r), min(q, s)] for (p, q), (r, s) in zip(a, b, strict=True)]
    return None if any(hi <= lo for lo, hi in out) else out


def _within(box: list[list[int]], outer: list[list[int]]) -> tuple:
    """``box``'s slices in an array holding ``outer``."""
    return tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(box, outer, strict=True))


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
        box = _overlap(region, bounds)
        if box is None:
            continue
        covered += math.prod(b - a for a, b in box)
        src, dst = _within(box[1:], bounds[1:]), _within(box[1:], region[1:])
        parts.append((i, bounds[0][0], tuple(box[0]), src, dst))
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


class _LeafCheck:
    """One leaf's recorded slices (``waiting``), checked from its shards."""

    def __init__(self, records: list) -> None:
        self.waiting = records  # those with a recorded value
        self.problem: str | None = None

    def shard(self, bounds: list[list[int]], data: np.ndarray) -> None:
        """Check the slices that ``data``, the shard at ``bounds``, contains."""
        waiting = []
        for record in self.waiting:
            region = record["index"]
            if _contains(bounds, region):
                part = data[_within(region, bounds)]
                self._compare(record, digest(part, recorded(record)[0]))
            else:
                waiting.append(record)
        self.waiting = waiting

    def split(self, shards: list[tuple[list, np.ndarray]], dtype) -> None:
        """Check the slices split over ``shards`` (every local one), band by
        band; those not all local (split between processes) stay waiting."""
        waiting = []
        for record in self.waiting:
            got = _region_digest(
                record["index"],
                shards,
                lambda i: shards[i][1],
                dtype,
                recorded(record)[0],
            )
            if got is None:
                waiting.append(record)
            else:
                self._compare(record, got)
        self.waiting = waiting

    def _compare(self, record: dict, got: int) -> None:
        if got != recorded(record)[1] and self.problem is None:
            self.problem = _mismatch(record["index"])


class Verifier:
    """Checks the arrays of one restore against the checksums, as they are read.

    The restore's reader (``ReadHookArrayHandler``) calls :meth:`shard` with
    each distinct shard once TensorStore has read it, in the reading thread:
    the slices it contains are hashed while its bytes are in hand.
    :meth:`finish` checks after the read what is left (slices split over
    shards, shards the reader did not hand over), in a thread pool, and
    raises :class:`ChecksumError` naming the leaves that differ.
    """

    def __init__(
        self, step: int, directory: str, item_dir: str, meta: dict, records: list
    ):
        self.step, self.directory, self.item_dir = step, directory, item_dir
        by_leaf: dict[int, list] = {}
        for record in records:
            if recorded(record)[1] is not None:
                by_leaf.setdefault(record["leaf"], []).append(record)
        self._records = {
            name: by_leaf[i]
            for i, name in enumerate(meta["checksum_order"])
            if by_leaf.get(i)
        }
        self._leaves: dict[str, _LeafCheck] = {}
        self._whole: dict[str, Callable[[list], np.ndarray]] = {}
        self._failed: BaseException | None = None

    def shard(self, name: str, bounds: list[list[int]], data) -> None:
        """Check one shard of ``name`` that was just read.

        Never raises into Orbax's read (where any error would read as a
        damaged file): a failure of the check itself is raised by
        :meth:`finish`.
        """
        records = self._records.get(name)
        if records is None or self._failed is not None:
            return
        check = self._leaves.get(name)
        if check is None:
            check = self._leaves[name] = _LeafCheck(records)
        try:
            check.shard(bounds, data)
        except Exception as err:  # raised by finish, as itself
            self._failed = err

    def opened(self, name: str, read_whole: Callable[[list], np.ndarray]) -> None:
        """``read_whole(box)``: any slice of ``name`` as saved, read from the
        files (for the slices split between processes, see ``_check_leaf``)."""
        self._whole[name] = read_whole

    def finish(self, got: dict) -> None:
        """Check what is left, wait, and raise if any leaf differs: on every
        process of the job, whichever process found it."""
        failed, bad = self._failed, []
        if failed is None:
            try:
                bad = self._check_the_rest(got)
            except Exception as err:  # raised below, after the others are told
                failed = err
        leaves = ", ".join(f"{name} ({problem})" for name, problem in bad[:20])
        found = (
            f"{len(bad)} array(s) differ from what was saved: {leaves}" if bad else ""
        )
        if failed is not None:
            found = f"{_UNCHECKED} ({type(failed).__name__}: {failed})"
        corrupt = bool(bad)
        if jax.process_count() > 1:  # every process raises, or none
            texts = gather_texts(found)
            found = "; ".join(f"process {i}: {t}" for i, t in enumerate(texts) if t)
            corrupt = any(t and not t.startswith(_UNCHECKED) for t in texts)
            if failed is None and found and not corrupt:
                raise CheckpointError(
                    f"step {self.step} in {self.directory} could not be verified: "
                    f"{found}"
                )
        if corrupt:  # on every process, its own check failed or not: all
            # of them then look for an earlier intact step, reading together
            files = data_files(self.directory, self.step, self.item_dir)
            shown = ", ".join(os.path.relpath(f, self.directory) for f in files[:3])
            more = f" and {len(files) - 3} more" if len(files) > 3 else ""
            raise ChecksumError(
                f"step {self.step} in {self.directory} is corrupted: {found}; the "
                f"bytes are in {os.path.join(str(self.step), self.item_dir)} "
                f"(files {shown}{more})"
            ) from failed
        if failed is not None:
            raise failed

    def _check_the_rest(self, got: dict) -> list[tuple[str, str]]:
        """``(leaf, problem)`` of every leaf that differs, the rest checked."""
        problems, jobs = {}, {}
        for item, tree in got.items():
            for path, leaf in nested_paths(tree).items():
                name = f"{item}/{path}"
                check = self._leaves.get(name)
                if check is not None and check.problem:
                    problems[name] = check.problem
                elif rest := (check.waiting if check else self._records.get(name)):
                    whole = self._whole.get(name)
                    jobs[name] = _POOL.submit(_check_leaf, leaf, rest, whole)
        problems.update({name: job.result() for name, job in jobs.items()})
        return [(name, problem) for name, problem in problems.items() if problem]


_UNCHECKED = "the check itself failed"
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
