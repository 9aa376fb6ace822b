"""One array of a shardopt restore, read and placed on its devices.

Orbax's own read (``serialization._read_and_create_array``) does, per shard
and device, work that a restore can do once per array, measured for 338 MiB of
ZeRO-1 AdamW state read onto 8 CPU devices:

- each shard is read into ``np.zeros``: the zeros are written (``memset``,
  ~7% of the restore's CPU time in ``perf``, onto a (4, 2) mesh) and then
  overwritten by the read;
- those buffers are 16-byte aligned, so XLA copies three in four of them
  when it places them on a CPU device (it takes a host buffer as it is only
  when 64-byte aligned): another ~7%;
- bytes are reserved, and ``jax.device_put`` is called, once per shard and
  device (~100 us a call; 464 calls here).

This read makes each shard's buffer empty and 64-byte aligned, reserves the
array's bytes once, and places every shard on every device that holds it
with one batched ``device_put``. It reads the same bytes with the same
TensorStore calls, concurrently, under the same limit on bytes in flight, and
hands each shard to the restore's check as Orbax's hooked read does
(``_reads``).
"""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Any

import jax
import numpy as np
import tensorstore as ts
from jax.experimental.layout import Format
from jax.sharding import SingleDeviceSharding
from orbax.checkpoint._src.serialization import limits, serialization

ALIGNMENT = 64  # bytes: what XLA's CPU client needs to take a buffer as it is


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data is ``ALIGNMENT``-aligned."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


async def read_array(
    read: Any, t: ts.TensorStore, global_shape: tuple, sharding, kwargs: dict
) -> tuple[jax.Array, int] | None:
    """``(array, bytes read)``, or None where Orbax's read must do it: a
    read with padding, truncation or a cast, or one whose shards together
    exceed the limit on bytes in flight (Orbax's reserves shard by shard).

    ``read`` is the restore's ``_reads._Read``: its tasks, and where each
    shard read is handed over; ``kwargs`` are the rest of ``_read_and_create_array``'s.
    """
    dtype = kwargs["dtype"]
    if not kwargs["strict"] or t.shape != global_shape:
        return None
    if dtype is not None and np.dtype(dtype) != t.dtype.numpy_dtype:
        return None
    devices_by_box = collections.defaultdict(list)  # this process's devices
    for device, index in sharding.addressable_devices_indices_map(global_shape).items():
        box = tuple(s.indices(n)[:2] for s, n in zip(index, global_shape, strict=True))
        devices_by_box[box].append(device)
    domains = {
        box: ts.IndexDomain(
            inclusive_min=[a for a, _ in box], exclusive_max=[b for _, b in box]
        )
        for box in devices_by_box
    }
    limiter = kwargs["byte_limiter"]
    nbytes = sum(
        serialization.estimate_read_memory_footprint(t, d) for d in domains.values()
    )
    if nbytes >= getattr(limiter, "max_bytes", math.inf):
        return None
    async with limits.reserved_bytes(limiter, nbytes):
        shards = await asyncio.gather(
            *(_read_shard(read, t, box, d) for box, d in domains.items())
        )
        copies, places = [], []
        for shard, devices in zip(shards, devices_by_box.values(), strict=True):
            for device in devices:
                copies.append(shard)
                place = SingleDeviceSharding(device, memory_kind=sharding.memory_kind)
                places.append(Format(kwargs["dll"], place))
        placed = jax.device_put(copies, places)
    array = jax.make_array_from_single_device_arrays(global_shape, sharding, placed)
    return array, nbytes


async def _read_shard(read: Any, t: ts.TensorStore, box: tuple, domain) -> np.ndarray:
    """The shard ``box`` (``domain``) of ``t``, read into an aligned buffer
    and handed to the restore's check. A failed read is raised in Orbax's
    words ("Encountered error while reading array index", which the
    restore's ``read_error`` recognises as a damaged file), with
    TensorStore's error (which names the file) as its cause."""
    read.tasks.append(asyncio.current_task())
    out = aligned_empty(tuple(b - a for a, b in box), t.dtype.numpy_dtype)
    try:
        await _read_into(out, t, domain)
    except Exception as err:
        raise Exception(
            f"Encountered error while reading array index: {domain}. See full "
            f"TensorStore details: {t.spec}."
        ) from err
    read.hand_over(t, [list(pair) for pair in box], out)
    return out


def _read_into(out: np.ndarray, t: ts.TensorStore, domain) -> Any:
    """TensorStore's read of ``domain`` of ``t`` into ``out`` (awaitable)."""
    return ts.array(out)[ts.d[:].translate_to[domain.origin]].write(t[domain])
