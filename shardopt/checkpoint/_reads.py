"""Orbax's array reads, hooked: each shard handed to a sink as it is read.

The restore checks every shard against the checksums recorded at save while
its bytes are still in hand: on the host, before they are placed on the
devices (on an accelerator, a check of the restored arrays would copy them
back to the host first). Orbax has no public hook there, so three of its
private functions are wrapped, once, when this module is imported:

- ``serialization._read_and_create_array`` (one array: its shards read and
  placed on the devices) reads with ``_array_read.read_array``, which does
  what Orbax's does at less cost (that module says where Orbax's spends it)
  and hands each shard to the sink; Orbax's own reads what that one does
  not (a cast, padding, an array over the limit on bytes in flight);
- ``serialization._read_shard`` (one shard, in Orbax's own array read)
  hands the shard to the sink;
- both, and ``serialization.async_deserialize`` (one array), note their
  tasks, so that a failed read waits for the others instead of leaving them
  reading after the restore has raised.

The wrappers act only inside a shardopt restore: its reader sets a context
variable that the read's tasks inherit. Everywhere else (another Orbax user
in the same process included) the context holds nothing and the read is
Orbax's, unchanged. If a later Orbax renames ``_read_shard`` or
``async_deserialize``, ``HOOKED`` is False, nothing is wrapped, and the
restore checks the arrays after the read; if ``_read_and_create_array`` has
another signature, ``LEAN`` is False and every array is read by Orbax's.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import serialization
from orbax.checkpoint.type_handlers import ArrayHandler

from ._array_read import read_array
from ._tree import entry_name


class ShardSink(Protocol):
    """What a restore's reader tells about the arrays it reads."""

    def shard(self, name: str, bounds: list[list[int]], data: np.ndarray) -> None:
        """One distinct shard of ``name``, read (called in Orbax's event loop)."""

    def opened(self, name: str, read_whole: Callable[[list], np.ndarray]) -> None:
        """``name`` is being read; ``read_whole(box)`` reads any slice of it
        (``[start, stop)`` per axis) from the files, after the restore's read."""


class _Read:
    """One restore's read, as its tasks see it: the array names by Orbax key,
    the sink, and the tasks reading the arrays."""

    def __init__(self, names: dict[str, str], sink: ShardSink | None) -> None:
        self.names, self.sink = names, sink
        self.tasks: list[asyncio.Task] = []
        self._stores: dict[int, tuple] = {}  # id -> (TensorStore, name, dtype)

    def store(self, t) -> tuple:
        """``(t, its array's name, its dtype)``, looked up once per array (t
        is kept, so that its id is not reused; each lookup costs ~5 us)."""
        found = self._stores.get(id(t))
        if found is None:
            # the array's key in the item: the kvstore path's last part
            key = t.kvstore.path.rstrip("/").rsplit("/", 1)[-1]
            found = self._stores[id(t)] = (t, self.names.get(key), t.dtype.numpy_dtype)
            if self.sink is not None and found[1] is not None:
                self.sink.opened(found[1], functools.partial(_read_whole, t))
        return found

    def hand_over(self, t, bounds: list[list[int]], data: np.ndarray) -> None:
        """Give the sink one distinct shard of ``t``'s array, just read."""
        if self.sink is not None and (name := self.store(t)[1]) is not None:
            self.sink.shard(name, bounds, data)


_READ: contextvars.ContextVar[_Read | None] = contextvars.ContextVar(
    "shardopt_read", default=None
)


def _handing_shards_over(original: Callable) -> Callable:
    """``_read_shard`` that notes its task and hands the shard to the sink.

    A shard read with a cast or padding is not handed over: its bytes are
    not those saved (the restore checks that array after the read).
    """

    async def read_shard(t, *args, **kwargs):
        read = _READ.get()
        if read is not None:
            read.tasks.append(asyncio.current_task())
        out = await original(t, *args, **kwargs)
        if read is not None and read.sink is not None:
            bounds = _saved_bounds(read, t, kwargs, out)
            if bounds is not None:
                read.hand_over(t, bounds, out)
        return out

    return read_shard


def _saved_bounds(read: _Read, t, kwargs: dict, out: np.ndarray) -> list | None:
    """The bounds of a shard to hand over; None for one that cannot be (its
    bytes are not those saved, or the read is not one this Orbax describes
    as expected): the check after the read takes it."""
    try:
        requested = kwargs["requested_domain"]
        if requested != kwargs["restricted_domain"] or out.dtype != read.store(t)[2]:
            return None  # padded or cast
        # the bounds as tuples: iterating the domain's dimensions costs ~20 us
        bounds = zip(requested.inclusive_min, requested.exclusive_max, strict=True)
        return [[a, b] for a, b in bounds]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _read_whole(t, box: list[list[int]]) -> np.ndarray:
    """The slice ``box`` of the saved array ``t``, read from the files."""
    return t[tuple(slice(a, b) for a, b in box)].read().result()


def _noting_tasks(original: Callable) -> Callable:
    """``async_deserialize`` that notes the task reading each array."""

    async def async_deserialize(*args, **kwargs):
        read = _READ.get()
        if read is not None:
            read.tasks.append(asyncio.current_task())
        return await original(*args, **kwargs)

    return async_deserialize


def _reading_arrays_leanly(original: Callable) -> Callable:
    """``_read_and_create_array`` that, inside a shardopt read, reads and
    places the array with ``_array_read.read_array`` where it can, and
    with Orbax's own function elsewhere."""

    async def read_and_create_array(t, *, global_shape, sharding, **kwargs):
        read = _READ.get()
        if read is not None:
            done = await read_array(read, t, global_shape, sharding, kwargs)
            if done is not None:
                return done
        return await original(t, global_shape=global_shape, sharding=sharding, **kwargs)

    return read_and_create_array


_LEAN_SIGNATURE = {
    "t",
    "global_shape",
    "new_shard_shape",
    "sharding",
    "dtype",
    "byte_limiter",
    "strict",
    "dll",
}


def _install() -> tuple[bool, bool]:
    """Wrap the functions once: ``(hooked, lean)``, each False where this
    Orbax lacks what it wraps."""
    wrappers = {
        "_read_shard": _handing_shards_over,
        "async_deserialize": _noting_tasks,
    }
    found = {name: getattr(serialization, name, None) for name in wrappers}
    if not all(asyncio.iscoroutinefunction(f) for f in found.values()):
        return False, False
    create = getattr(serialization, "_read_and_create_array", None)
    lean = (
        asyncio.iscoroutinefunction(create)
        and set(inspect.signature(create).parameters) == _LEAN_SIGNATURE
    )
    if lean:
        wrappers["_read_and_create_array"] = _reading_arrays_leanly
        found["_read_and_create_array"] = create
    for name, wrap in wrappers.items():
        if not getattr(found[name], "shardopt_hook", False):
            wrapped = wrap(found[name])
            wrapped.shardopt_hook = True
            setattr(serialization, name, wrapped)
    return True, lean


HOOKED, LEAN = _install()


class ReadHookArrayHandler(ArrayHandler):
    """Orbax's ArrayHandler that hands every shard it reads to ``sink``.

    The arrays are read in one Orbax call (with Orbax's concurrency); with a
    sink set, the sink gets each distinct shard once TensorStore has read it.
    If any array fails to read, the others are let finish before the error
    is raised; in a job of several processes it is kept in ``failed`` instead,
    and the read returns stand-ins, so that this process still meets the
    others at the barrier that ends Orbax's restore (the restore then raises
    on every process, once they have told each other). Saving is Orbax's,
    unchanged.
    """

    def __init__(self) -> None:
        super().__init__(array_metadata_store=array_metadata_store.Store())
        self.sink: ShardSink | None = None
        self.failed: Exception | None = None
        # reads the arrays without the array metadata file (it only wraps
        # typed PRNG keys; ours are saved as raw key data)
        self._array_reader = ArrayHandler()

    async def deserialize(self, infos, args=None):
        if args is None:
            return await super().deserialize(infos, args)
        read = _Read({info.name: keypath_name(info) for info in infos}, self.sink)
        token = _READ.set(read)  # the read's tasks copy this context
        try:
            return await self._array_reader.deserialize(infos, args)
        except Exception as err:
            # no read is left running once the restore has failed: the others
            # (arrays and their shards) are let finish; cancelled, TensorStore
            # would still call back into Orbax's event loop after it closed
            while pending := [task for task in read.tasks if not task.done()]:
                await asyncio.wait(pending)
            if jax.process_count() == 1:
                raise
            self.failed = err
            return [_stand_in(arg) for arg in args]
        finally:
            _READ.reset(token)


def _stand_in(arg: Any) -> jax.Array:
    """Zeros in the layout an array was to be restored in (``arg``, its
    restore arguments), put in its place when its read failed."""
    shard = np.zeros(arg.sharding.shard_shape(arg.global_shape), arg.dtype)
    return jax.make_array_from_callback(arg.global_shape, arg.sharding, lambda _: shard)


def keypath_name(info: Any) -> str:
    """``'params/layer0/w'``: a leaf's path in the restored tree, as recorded."""
    if info.keypath is None:
        return info.name.replace(".", "/")
    return "/".join(entry_name(k) for k in info.keypath)
