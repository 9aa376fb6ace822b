"""Host offload of optimizer state: memory kinds on the plan's devices.

A device addresses one or more *memories* (``device.addressable_memories()``):
its own (kind ``"device"``) and, where the backend has them, host memory
(``"pinned_host"``: page-locked, so transfers run by DMA; ``"unpinned_host"``).
An offloaded plan keeps the optimizer state in a host memory between steps;
the step brings it to device memory for the update and writes it back, so the
device holds the state only while it updates it (ZeRO-Offload's placement,
Ren et al., "ZeRO-Offload: Democratizing Billion-Scale Model Training",
USENIX ATC 2021, with the update on the device rather than the CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import Mesh, NamedSharding
from jaxtyping import PyTree

if TYPE_CHECKING:
    from ._plan import ShardingPlan

HOST_MEMORY = "pinned_host"  # what ``zero(..., offload_state=True)`` uses
DEVICE_MEMORY = "device"  # a device's own memory (jax's name on every backend)


def memory_kinds(device: Any) -> tuple[str, ...]:
    """The memory kinds ``device`` can address, e.g. ``('device', 'pinned_host')``."""
    return tuple(memory.kind for memory in device.addressable_memories())


def is_host_memory(kind: str | None) -> bool:
    """True for memory kinds in host RAM (``pinned_host``, ``unpinned_host``)."""
    return kind is not None and kind.endswith("host")


def check_memory_kind(kind: str, mesh: Mesh) -> None:
    """Raise unless every device of ``mesh`` this process addresses has ``kind``.

    The error names the kind, the first device without it and the kinds that
    device has, so that a backend without host memory fails at plan time, not
    inside a compiled step.
    """
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"a memory kind is a non-empty string, got {kind!r}")
    here = jax.process_index()
    for device in mesh.devices.flat:
        if device.process_index != here:
            continue
        kinds = memory_kinds(device)
        if kind not in kinds:
            raise ValueError(
                f"cannot keep the optimizer state in memory kind {kind!r}: device "
                f"{device} ({device.platform}) has no such memory; the memory "
                f"kinds it can address are {', '.join(map(repr, kinds))}. Use one "
                "of those, or build the plan without offload_state"
            )


def with_memory_kind(shardings: PyTree, kind: str | None) -> PyTree:
    """Every NamedSharding of ``shardings`` on memory ``kind`` (None: unchanged)."""
    if kind is None:
        return shardings
    return jax.tree.map(
        lambda s: s.with_memory_kind(kind),
        shardings,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def offload_kind(offload_state: bool | str | None) -> str | None:
    """The memory kind ``zero(..., offload_state=...)`` asks for (None: none)."""
    if offload_state is True:
        return HOST_MEMORY
    if offload_state is False or offload_state is None:
        return None
    if isinstance(offload_state, str):
        return offload_state
    raise TypeError(
        "offload_state must be True, False or a memory kind such as "
        f"'pinned_host', got {offload_state!r}"
    )


def state_on_device(plan: ShardingPlan, state: PyTree, params: PyTree) -> PyTree:
    """``state`` moved to device memory for an update, when ``plan`` offloads it
    (as is otherwise); the step writes the new state back with
    ``plan.state_shardings``, whose memory kind is the plan's."""
    if plan.state_memory_kind in (None, DEVICE_MEMORY):
        return state
    shardings = plan.state_shardings(state, params, DEVICE_MEMORY)
    # device_put, not a sharding constraint: under jit only it changes the
    # traced value's memory space, which operations check
    return jax.tree.map(jax.device_put, state, shardings)
