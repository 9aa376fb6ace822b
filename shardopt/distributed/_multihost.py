"""What every process of a multi-host job calls: start-up and agreement checks.

The same script runs as N processes (a TPU pod, a multi-node GPU job, or
:func:`shardopt.launch_local` on one machine). Each process calls
:func:`initialize_multihost` first, then makes the same JAX calls in the same
order; :func:`check_processes_agree` turns the classic multi-host bug (processes
that build different meshes or parameter trees, and then hang in a collective)
into an error raised on every process.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from .._tree import path_str

# Environment variables through which shardopt.launch_local hands each child its
# place in the job; initialize_multihost reads them.
ENV_COORDINATOR = "SHARDOPT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SHARDOPT_NUM_PROCESSES"
ENV_PROCESS_ID = "SHARDOPT_PROCESS_ID"
ENV_INIT_TIMEOUT = "SHARDOPT_INITIALIZATION_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "SHARDOPT_HEARTBEAT_TIMEOUT"
ENV_SHUTDOWN_TIMEOUT = "SHARDOPT_SHUTDOWN_TIMEOUT"

_UNREACHABLE = """\
process {process_id} of {num_processes} could not join the JAX distributed job \
through the coordinator at {address} within {timeout} s.
  Is process 0 running, and is the address (host and port) the one it serves on?
  Process 0 hosts the coordinator: it must start too, with the same address and
  the same number of processes.
  The error was: {error}"""

_NO_CLUSTER = """\
initialize_multihost found no launcher environment ({env} unset) and JAX could \
not detect a cluster (TPU pod, SLURM, Open MPI, ...).
  Start the script with shardopt.launch_local, on a pod, or pass
  coordinator_address, num_processes and process_id. A single-process run does
  not need initialize_multihost at all.
  The error from JAX was: {error}"""


class ProcessMismatchError(RuntimeError):
    """Processes of one job built different meshes, plans or parameter trees."""


def initialize_multihost(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int | None = None,
    heartbeat_timeout_seconds: int | None = None,
    shutdown_timeout_seconds: int | None = None,
) -> None:
    """Join the multi-host job: ``jax.distributed.initialize`` with clear errors.

    Call it first, on every process, before any other JAX call. Arguments left
    as ``None`` come from :func:`shardopt.launch_local`'s environment when the
    process was started by it, otherwise from JAX's cluster auto-detection (TPU
    pods, SLURM, Open MPI; see ``jax.distributed.initialize``), so one script
    runs unchanged on one machine and on a pod.

    If the distributed system is already running (the launcher starts it
    before calling a function or running a script) this returns at once, so a
    script that calls it runs both under the launcher and on its own.

    Raises:
        RuntimeError: the coordinator could not be reached within
            ``initialization_timeout`` seconds, naming the address and process,
            or no cluster was found.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    launched = ENV_COORDINATOR in env
    if launched:
        coordinator_address = coordinator_address or env[ENV_COORDINATOR]
        num_processes = _int(num_processes, env, ENV_NUM_PROCESSES)
        process_id = _int(process_id, env, ENV_PROCESS_ID)
        initialization_timeout = _int(initialization_timeout, env, ENV_INIT_TIMEOUT)
        heartbeat_timeout_seconds = _int(
            heartbeat_timeout_seconds, env, ENV_HEARTBEAT_TIMEOUT
        )
        shutdown_timeout_seconds = _int(
            shutdown_timeout_seconds, env, ENV_SHUTDOWN_TIMEOUT
        )
    kwargs: dict[str, Any] = {}
    if initialization_timeout is not None:
        kwargs["initialization_timeout"] = initialization_timeout
    if heartbeat_timeout_seconds is not None:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_seconds
    if shutdown_timeout_seconds is not None:
        kwargs["shutdown_timeout_seconds"] = shutdown_timeout_seconds
    explicit = None not in (coordinator_address, num_processes, process_id)
    if explicit:
        # Everything is given: skip auto-detection (which could pick up e.g. a
        # SLURM environment around a local test run) and serve the coordinator
        # on exactly the address given, not on every interface.
        kwargs["cluster_detection_method"] = "deactivate"
        kwargs["coordinator_bind_address"] = coordinator_address
    if explicit and process_id != 0:
        # JAX aborts the whole process (no Python exception) when it cannot
        # register with the coordinator in time; wait for the port ourselves
        # so that the failure is an error that names the address.
        timeout = kwargs.get("initialization_timeout", 300)
        error = _wait_for_port(coordinator_address, timeout)
        if error is not None:
            raise RuntimeError(
                _UNREACHABLE.format(
                    process_id=process_id,
                    num_processes=num_processes,
                    address=coordinator_address,
                    timeout=timeout,
                    error=error,
                )
            )
    try:
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id, **kwargs
        )
    except ValueError as err:
        if explicit:
            raise
        raise RuntimeError(_NO_CLUSTER.format(env=ENV_COORDINATOR, error=err)) from err
    except Exception as err:  # jaxlib raises its own XlaRuntimeError
        if not explicit:
            raise
        raise RuntimeError(
            _UNREACHABLE.format(
                process_id=process_id,
                num_processes=num_processes,
                address=coordinator_address,
                timeout=kwargs.get("initialization_timeout", 300),
                error=str(err).strip().splitlines()[0] if str(err) else repr(err),
            )
        ) from err


def _wait_for_port(address: str, timeout: float) -> str | None:
    """None once a TCP connection to ``host:port`` succeeds; else the last error."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return None
        except OSError as err:
            if time.monotonic() >= deadline:
                return f"{type(err).__name__}: {err}"
        time.sleep(0.1)


def _int(value: int | None, env: os._Environ, name: str) -> int | None:
    if value is not None or name not in env:
        return value
    return int(env[name])


def describe_mesh(mesh: jax.sharding.Mesh) -> str:
    """One line per property of ``mesh`` that every process must agree on."""
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    lines = [
        f"axis_names={tuple(mesh.axis_names)}",
        f"shape={tuple(mesh.axis_sizes)}",
        f"axis_types={tuple(str(t) for t in mesh.axis_types)}",
    ]
    if isinstance(mesh, jax.sharding.Mesh):
        lines.append(f"device_ids={mesh.device_ids.tolist()}")
    return "\n".join(lines)


def describe_tree(tree: Any) -> str:
    """One line per leaf: its path, dtype and shape, and its sharding if it has one.

    Non-array leaves contribute only their type, so a function or an object
    whose ``repr`` holds a memory address does not make processes disagree.
    """
    if isinstance(tree, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        return describe_mesh(tree)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    lines = []
    for path, leaf in flat:
        name = path_str(path)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            shape = ",".join(str(d) for d in leaf.shape)
            line = f"{name}: {np.dtype(leaf.dtype).name}[{shape}]"
            sharding = getattr(leaf, "sharding", None)
            if isinstance(sharding, jax.sharding.NamedSharding):
                line += f" spec={tuple(sharding.spec)}"
            lines.append(line)
        else:
            lines.append(f"{name}: {type(leaf).__qualname__}")
    return "\n".join(lines) or "<empty tree>"


_DETAIL_BYTES = 8192
_MAX_ITEMS = 16


def check_processes_agree(**items: Any) -> None:
    """Raise on every process unless all processes passed the same ``items``.

    Each item is a mesh or a pytree (parameters, an optimizer, a plan's
    shardings); what is compared is its structure, never its values: leaf
    paths, dtypes, shapes and shardings, and a mesh's axes and device order.
    Call it with the same names on every process, at the same point of the
    script, e.g. ``check_processes_agree(mesh=mesh, params=params)``. It costs
    one tiny all-gather (two if the processes disagree), and turns a mismatch
    that would hang in the first collective into an error that names the
    processes and the first lines on which they differ.

    With a single process it checks nothing and returns.

    Raises:
        ProcessMismatchError: on every process, when any two processes differ.
    """
    if not items:
        raise TypeError("check_processes_agree needs at least one named item")
    if jax.process_count() == 1:
        return
    if len(items) > _MAX_ITEMS:
        raise TypeError(
            f"check_processes_agree compares at most {_MAX_ITEMS} items at once, "
            f"got {len(items)}: group them in a dict"
        )
    described = {name: describe_tree(item) for name, item in sorted(items.items())}
    # A fixed-size array whatever was passed, so that the collective matches
    # on every process even when they pass different names: row 0 hashes the
    # names, row 1 + i the description of item i.
    digest = np.zeros((1 + _MAX_ITEMS, 32), np.uint8)
    for row, text in enumerate([" ".join(described), *described.values()]):
        digest[row] = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = multihost_utils.process_allgather(digest)  # [process, 1 + item, 32]
    if not (digests[:, 0] == digests[0, 0]).all():
        differ = ["the names of the items checked"]
        described = {differ[0]: " ".join(described)}
        flat = digests[:, [0]]
    else:
        differ = [
            name
            for i, name in enumerate(described)
            if not (digests[:, 1 + i] == digests[0, 1 + i]).all()
        ]
        flat = digests[:, [1 + list(described).index(n) for n in differ]]
    if not differ:
        return
    # Every process took this branch (they all see the same digests), so the
    # second collective is matched on every process.
    text = "\n".join(f"== {name}\n{described[name]}" for name in differ)
    raise ProcessMismatchError(_mismatch_message(differ, flat, gather_texts(text)))


def gather_texts(text: str, limit: int = _DETAIL_BYTES) -> list[str]:
    """Every process's ``text`` (its first ``limit`` bytes), by process index.

    A collective: every process of the job must call it at the same point.
    """
    encoded = text.encode()[:limit]
    padded = np.zeros(limit + 4, np.uint8)
    padded[:4] = np.frombuffer(np.uint32(len(encoded)).tobytes(), np.uint8)
    padded[4 : 4 + len(encoded)] = np.frombuffer(encoded, np.uint8)
    texts = []
    for row in multihost_utils.process_allgather(padded):
        size = int(np.frombuffer(row[:4].tobytes(), np.uint32)[0])
        texts.append(row[4 : 4 + size].tobytes().decode(errors="replace"))
    return texts


def _mismatch_message(names: list[str], digests: np.ndarray, texts: list[str]) -> str:
    groups: dict[bytes, list[int]] = {}
    for process, row in enumerate(digests):
        groups.setdefault(row.tobytes(), []).append(process)
    # Sorted names, so the message is the same on every process.
    procs = list(groups.values())
    lines = [
        f"the {len(digests)} processes of this job disagree on "
        f"{', '.join(names)} (this is process {jax.process_index()}).",
        "  Every process must build the same mesh and the same parameter tree, "
        "with the same calls in the same order; only the data each process "
        "loads may differ.",
        "  Groups of processes that agree: "
        + "; ".join(f"processes {g}" for g in procs),
    ]
    first = procs[0][0]
    for group in procs[1:]:
        other = group[0]
        diff = list(
            difflib.unified_diff(
                texts[first].splitlines(),
                texts[other].splitlines(),
                f"process {first}",
                f"process {other}",
                n=0,
                lineterm="",
            )
        )
        lines.append(f"  First differences, process {first} vs process {other}:")
        lines += [f"    {line}" for line in diff[:12]]
        if len(diff) > 12:
            lines.append(f"    ... ({len(diff) - 12} more lines)")
    return "\n".join(lines)
