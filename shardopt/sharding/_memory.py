"""Memory per device and per leaf: predicted from shapes, measured from arrays."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import PyTree

from .._interop import as_transform, is_transform
from .._tree import path_str, trainable
from ._offload import DEVICE_MEMORY, is_host_memory

keystr = jax.tree_util.keystr

ROLES = ("params", "grads", "state")
MEMORIES = ("device", "host")  # where bytes are counted: device memory or host RAM


@dataclasses.dataclass(frozen=True)
class LeafBytes:
    """One leaf: its role, path, shape, dtype, spec, and bytes on each device.

    ``memory_kind`` is the memory those bytes are in: ``"device"``, or a host
    memory (``"pinned_host"``) for an offloaded state; ``memory`` says which.
    """

    role: str
    path: str
    shape: tuple[int, ...]
    dtype: Any
    spec: PartitionSpec | None
    per_device: tuple[int, ...]
    note: str | None = None
    memory_kind: str = DEVICE_MEMORY

    @property
    def memory(self) -> str:
        """``"host"`` for bytes in host memory, else ``"device"``."""
        return "host" if is_host_memory(self.memory_kind) else "device"


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of parameters, gradients and optimizer state on every device.

    ``leaves`` has one row per leaf; ``devices`` the device ids in mesh order,
    which ``per_device`` columns follow. ``totals()`` sums per role and device;
    ``memory_totals()`` per memory (device memory apart from host memory).
    """

    devices: tuple[int, ...]
    leaves: tuple[LeafBytes, ...]
    stage: int | None = None
    data_size: int | None = None

    def totals(self, memory: str | None = None) -> dict[str, tuple[int, ...]]:
        """``{role: bytes on each device}`` for params, grads and state; only
        those in ``memory`` (``"device"`` or ``"host"``) if given."""
        if memory is not None and memory not in MEMORIES:
            raise ValueError(f"memory must be 'device' or 'host', got {memory!r}")
        return {
            role: self._sum(
                leaf
                for leaf in self.leaves
                if leaf.role == role and memory in (None, leaf.memory)
            )
            for role in ROLES
        }

    def memory_totals(self) -> dict[str, tuple[int, ...]]:
        """``{"device": bytes, "host": bytes}`` per device, over all roles: what
        each device's own memory holds, and what is kept for it in host memory."""
        return {
            memory: self._sum(leaf for leaf in self.leaves if leaf.memory == memory)
            for memory in MEMORIES
        }

    def _sum(self, leaves) -> tuple[int, ...]:
        rows = [leaf.per_device for leaf in leaves]
        return tuple(int(sum(c)) for c in zip(*rows, strict=True)) or (
            (0,) * len(self.devices)
        )

    def per_leaf(self) -> dict[tuple[str, str], tuple[int, ...]]:
        """``{(role, path): bytes on each device}``."""
        return {(leaf.role, leaf.path): leaf.per_device for leaf in self.leaves}

    def not_partitioned(self) -> list[LeafBytes]:
        """Rows left in the parameter layout, with the reason in ``note``."""
        return [leaf for leaf in self.leaves if leaf.note]

    def table(self) -> str:
        """A plain-text table: per leaf bytes per device (max), then totals.

        With any leaf in host memory, a column gives each leaf's memory kind and
        the totals are also given per memory (device, host).
        """
        lines = []
        host = any(leaf.memory == "host" for leaf in self.leaves)
        head = f"{'role':<7}{'leaf':<44}{'shape':<16}{'spec':<28}"
        head += f"{'memory':<13}" if host else ""
        head += f"{'bytes/device':>13}"
        lines.append(head)
        lines.append("-" * len(head))
        for leaf in self.leaves:
            shape = "x".join(map(str, leaf.shape)) or "()"
            spec = "" if leaf.spec is None else str(tuple(leaf.spec))
            line = f"{leaf.role:<7}{leaf.path[:43]:<44}{shape:<16}{spec[:27]:<28}"
            line += f"{leaf.memory_kind[:12]:<13}" if host else ""
            line += f"{max(leaf.per_device, default=0):>13,}"
            if leaf.note:
                line += f"   (not partitioned: {leaf.note})"
            lines.append(line)
        lines.append("-" * len(head))
        totals = self.totals()
        if host:  # all roles, split by memory
            totals |= {f"{m} memory": v for m, v in self.memory_totals().items()}
        for name, per in totals.items():
            lo, hi = min(per, default=0), max(per, default=0)
            span = f"{hi:,}" if lo == hi else f"{lo:,} .. {hi:,}"
            width = 15 if host else 7
            lines.append(f"{name:<{width}}total per device: {span} bytes")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _shard_bytes(sharding, shape, dtype) -> int:
    shard = sharding.shard_shape(tuple(shape))
    return math.prod(shard) * jnp.dtype(dtype).itemsize


def memory_report(plan, params: PyTree, opt_or_transform: Any) -> MemoryReport:
    """Bytes per device and per leaf the plan will use, from shapes alone.

    ``params`` may be ShapeDtypeStructs; ``opt_or_transform`` is an
    :class:`shardopt.Optimizer` (its state is read) or a transform (its state
    is built abstractly with ``jax.eval_shape``). Nothing is allocated.
    Gradients are counted in the plan's gradient layout, one tree of them.
    An offloaded plan's state rows are in its host memory kind; the
    optimizer's own ``.count`` stays in device memory.
    """
    tp = trainable(params)
    abstract_tp = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tp)
    if is_transform(opt_or_transform):
        transform = as_transform(opt_or_transform, "memory_report")
        state = jax.eval_shape(transform.init, abstract_tp)
    else:  # an Optimizer (or anything holding a state)
        state = _per_leaf_state(opt_or_transform)
    devices = tuple(d.id for d in plan.mesh.devices.flat)
    n = len(devices)
    layout = plan.layout(params)
    rows = []
    for role, partitioned in (("params", plan.stage >= 3), ("grads", plan.stage >= 2)):
        for name, leaf in layout.items():
            spec = leaf.partitioned if partitioned else leaf.base
            size = _shard_bytes(plan.sharding(spec), leaf.shape, leaf.dtype)
            note = leaf.reason if partitioned else None
            rows.append(
                LeafBytes(role, name, leaf.shape, leaf.dtype, spec, (size,) * n, note)
            )
    kind = plan.state_memory_kind or DEVICE_MEMORY
    for leaf in plan.state_layout(state, params):
        size = _shard_bytes(plan.sharding(leaf.spec), leaf.shape, leaf.dtype)
        note = leaf.reason if plan.stage >= 1 else None
        rows.append(
            LeafBytes(
                "state",
                leaf.path,
                leaf.shape,
                leaf.dtype,
                leaf.spec,
                (size,) * n,
                note,
                memory_kind=kind,
            )
        )
    rows.append(
        LeafBytes("state", ".count", (), jnp.int32, PartitionSpec(), (4,) * n, None)
    )
    return MemoryReport(devices, tuple(rows), plan.stage, plan.data_size)


def _per_leaf_state(opt: Any) -> PyTree:
    """The state per leaf, as the plan places it. An optimizer that stores
    it in flat buffers shows it per leaf by unpacking: here only its shapes
    are taken (``jax.eval_shape``), so nothing is allocated. Its buffers hold
    on each device exactly the bytes of the per-leaf state's shards there
    (see :mod:`shardopt.sharding._flat`), so the rows are those bytes."""
    layout = getattr(opt, "layout", None)
    if layout is None:
        return opt.state
    return jax.eval_shape(layout.view, opt.stored_state)


def measure_memory(
    devices: Any,
    *,
    params: PyTree = None,
    grads: PyTree = None,
    opt: Any = None,
) -> MemoryReport:
    """Bytes per device and per leaf of live arrays, from their addressable shards.

    ``devices`` is a mesh (or a list of devices) fixing the column order. Pass
    any of ``params`` (trainable leaves are counted), ``grads`` and ``opt``
    (its state as stored, flat buffers where fused, and ``count``). Each
    leaf's memory is its sharding's ``memory_kind``.
    """
    if hasattr(devices, "devices"):
        devices = list(devices.devices.flat)
    ids = tuple(d.id for d in devices)
    column = {d: i for i, d in enumerate(ids)}
    rows = []

    def add(role, tree, prefix=""):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            per = [0] * len(ids)
            for shard in leaf.addressable_shards:
                per[column[shard.device.id]] += shard.data.nbytes
            spec = getattr(leaf.sharding, "spec", None)
            kind = getattr(leaf.sharding, "memory_kind", None) or DEVICE_MEMORY
            name = (
                prefix + (path_str(path) if path else "") if prefix else path_str(path)
            )
            shape, per = tuple(leaf.shape), tuple(per)
            rows.append(
                LeafBytes(role, name, shape, leaf.dtype, spec, per, memory_kind=kind)
            )

    if params is not None:
        add("params", trainable(params))
    if grads is not None:
        add("grads", trainable(grads))
    if opt is not None:  # as stored: flat buffers where fused
        add("state", getattr(opt, "stored_state", opt.state))
        add("state", opt.count, prefix=".count")
    return MemoryReport(ids, tuple(rows))
