"""A local multi-host job: N JAX processes on 127.0.0.1, each with M CPU devices.

Several processes on one machine, joined by ``jax.distributed`` with CPU
collectives (gloo), are a real multi-host run: every process owns only its
devices, arrays span processes, and collectives cross process boundaries. The
launcher is what tests and users use to prove a script right before it meets a
pod, and it never hangs: each process watches its own time, the coordinator's
heartbeat stops the survivors when a peer dies, and the launcher kills whatever
is left when its time is up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._hyperparams import as_count
from . import _multihost as mh

_TAIL_LINES = 80


@dataclasses.dataclass(frozen=True)
class ProcessResult:
    """What one process of a local job did.

    Attributes:
        process_id: its index in the job (``jax.process_index()`` inside it).
        returncode: its exit status; negative ``-N`` if killed by signal N;
            ``None`` if it was still running when the launcher gave up on it.
        output: its stdout and stderr, interleaved, as text.
        seconds: wall time from start to exit (or to being killed).
        value: the target function's return value (arrays as NumPy), or
            ``None`` for a script or a failed process.
        killed_by_launcher: True if the launcher had to end it.
    """

    process_id: int
    returncode: int | None
    output: str
    seconds: float
    value: Any = None
    killed_by_launcher: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.killed_by_launcher

    def how(self) -> str:
        """How it ended, in words: 'exited with code 1', 'killed by SIGKILL', ..."""
        if self.killed_by_launcher:
            return "still running: ended by the launcher"
        if self.returncode is None:
            return "still running"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"killed by {name}"
        return f"exited with code {self.returncode}"


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    """A finished local job: one :class:`ProcessResult` per process, in order."""

    processes: tuple[ProcessResult, ...]
    seconds: float

    @property
    def values(self) -> list[Any]:
        """Each process's return value, by process index."""
        return [p.value for p in self.processes]

    @property
    def outputs(self) -> list[str]:
        """Each process's output, by process index."""
        return [p.output for p in self.processes]


class LaunchError(RuntimeError):
    """A process of a local job failed, or the job ran out of time.

    The message says which process failed first and how, how the others ended,
    and shows each failed process's output with its lines prefixed
    ``[process i]``. ``result`` holds every process's :class:`ProcessResult`.
    """

    def __init__(self, message: str, result: LaunchResult):
        super().__init__(message)
        self.result = result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_local(
    target: Callable[..., Any] | str,
    num_processes: int,
    devices_per_process: int = 1,
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    timeout: float = 120.0,
    heartbeat_timeout: int = 5,
    initialization_timeout: int = 20,
    jax_config: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    echo: bool = False,
) -> LaunchResult:
    """Run ``target`` as a multi-host job of local processes; return their results.

    Starts ``num_processes`` Python processes on this machine, each with
    ``devices_per_process`` CPU devices, joined by ``jax.distributed`` through a
    coordinator on a free port of 127.0.0.1 (served by process 0, as on a pod).
    In each process the distributed system is initialised first, so inside the
    target ``jax.devices()`` lists all ``num_processes * devices_per_process``
    devices, ``jax.local_devices()`` its own, and ``jax.process_index()`` says
    which process it is.

    Args:
        target: what each process runs: a function defined at the top level
            of an importable module (or ``"package.module:function"``), called
            with ``args`` and ``kwargs``; or the path of a ``.py`` script, run as
            ``__main__`` with ``args`` as its command-line arguments.
        num_processes: how many processes.
        devices_per_process: CPU devices per process.
        args, kwargs: passed to the function (pickled); a script gets ``args``
            as ``sys.argv[1:]``.
        timeout: seconds the whole job may take. Each process exits by itself
            (dumping its stacks) when the time is up; the launcher kills what
            is left a few seconds later.
        heartbeat_timeout: seconds after which the coordinator declares a
            silent process dead, so that the others stop instead of waiting.
        initialization_timeout: seconds a process waits to join the job.
        jax_config: ``jax.config`` options set in every process before JAX
            starts, e.g. ``{"jax_numpy_dtype_promotion": "strict"}``.
        env: extra environment variables for the processes.
        echo: print every process's output as it comes, prefixed
            ``[process i]``.

    Returns:
        A :class:`LaunchResult`: ``result.values[i]`` is what process ``i``
        returned (arrays converted to NumPy: fully replicated arrays that span
        processes come back whole), ``result.outputs[i]`` what it printed.

    Raises:
        LaunchError: a process exited with an error, was killed, or the job ran
            out of time. The message names the process that failed first and
            how, and shows the output of every failed process.

    Example::

        # not run: it needs a module tasks.py, shown in its first lines
        # tasks.py
        def train(steps):
            mesh = jax.make_mesh((jax.device_count(),), ("data",))
            ...
            return params

        result = shardopt.launch_local("tasks:train", 2, 4, args=(10,))
        params_0, params_1 = result.values
    """
    num_processes = as_count(num_processes, name="num_processes")
    devices_per_process = as_count(devices_per_process, name="devices_per_process")
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(
            "num_processes and devices_per_process must be >= 1, got "
            f"{num_processes} and {devices_per_process}"
        )
    spec_target = _resolve(target)
    port = free_port()
    address = f"127.0.0.1:{port}"
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shardopt-launch-") as tmp:
        children = []
        for process_id in range(num_processes):
            result_path = os.path.join(tmp, f"result_{process_id}.pkl")
            spec_path = os.path.join(tmp, f"spec_{process_id}.pkl")
            spec = {
                "target": spec_target,
                "args": tuple(args),
                "kwargs": dict(kwargs or {}),
                "jax_config": dict(jax_config or {}),
                "result_path": result_path,
                "timeout": timeout,
            }
            with open(spec_path, "wb") as file:
                pickle.dump(spec, file)
            child_env = _child_env(
                env,
                devices_per_process,
                {
                    mh.ENV_COORDINATOR: address,
                    mh.ENV_NUM_PROCESSES: str(num_processes),
                    mh.ENV_PROCESS_ID: str(process_id),
                    mh.ENV_INIT_TIMEOUT: str(initialization_timeout),
                    mh.ENV_HEARTBEAT_TIMEOUT: str(heartbeat_timeout),
                    mh.ENV_SHUTDOWN_TIMEOUT: str(max(heartbeat_timeout, 5)),
                },
            )
            children.append(_Child(process_id, spec_path, result_path, child_env, echo))
        _wait(children, timeout, heartbeat_timeout)
        results = tuple(child.result(start) for child in children)
    launch = LaunchResult(results, time.monotonic() - start)
    failed = [r for r in results if not r.ok]
    if failed:
        raise LaunchError(_failure_message(launch, children, timeout), launch)
    return launch


def _resolve(target: Callable[..., Any] | str) -> tuple[str, str, str]:
    if callable(target):
        module = getattr(target, "__module__", None)
        name = getattr(target, "__qualname__", "")
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if module == "__main__" and main_file and "<" not in name:
            # As multiprocessing's spawn does: the children run the main script
            # under another name (so its `if __name__ == "__main__"` part does
            # not run again) and take the function from it.
            return ("main", os.path.abspath(main_file), name)
        if module in (None, "__main__") or "<locals>" in name or "<lambda>" in name:
            raise ValueError(
                f"launch_local needs a function that other processes can import: "
                f"{target!r} is defined in {module!r} as {name!r}. Define it at "
                "the top level of an importable module, or pass a script's path."
            )
        return ("function", module, name)
    if not isinstance(target, str):
        raise TypeError(
            f"target must be a function or a string, got {type(target).__name__}"
        )
    if target.endswith(".py"):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no script at {path}")
        return ("script", path, "")
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise ValueError(
            f"target {target!r} is neither a script path ending in .py nor "
            "'module:function'"
        )
    return ("function", module, name)


def _child_env(
    extra: Mapping[str, str] | None, devices: int, job: Mapping[str, str]
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra or {})
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")
    )
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = env["XLA_FLAGS"].strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    env["PYTHONUNBUFFERED"] = "1"
    # The children import what this process imports (the target's module and
    # shardopt itself), wherever it came from.
    paths = [p if p else os.getcwd() for p in sys.path]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(job)
    return env


class _Child:
    def __init__(self, process_id, spec_path, result_path, env, echo):
        self.process_id = process_id
        self.result_path = result_path
        self.lines: list[str] = []
        self.echo = echo
        self.killed = False
        self.started = time.monotonic()
        self.ended: float | None = None
        self.popen = subprocess.Popen(
            [sys.executable, "-u", "-m", "shardopt.distributed._worker", spec_path],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        # Exit times to the millisecond: which process failed first matters.
        self.waiter = threading.Thread(target=self._wait, daemon=True)
        self.waiter.start()

    def _wait(self):
        self.popen.wait()
        self.ended = time.monotonic()

    def _read(self):
        assert self.popen.stdout is not None
        with self.popen.stdout as stream:
            for line in stream:
                self.lines.append(line)
                if self.echo:
                    print(f"[process {self.process_id}] {line}", end="", flush=True)

    def poll(self) -> int | None:
        if self.ended is None:
            return None
        return self.popen.returncode

    def kill(self):
        if self.poll() is None:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.waiter.join()

    def result(self, start: float) -> ProcessResult:
        self.waiter.join()
        self.reader.join(timeout=5)
        value = None
        code = self.popen.returncode
        if code == 0 and os.path.exists(self.result_path):
            with open(self.result_path, "rb") as file:
                value = pickle.load(file)
        ended = self.ended if self.ended is not None else time.monotonic()
        return ProcessResult(
            self.process_id,
            code,
            "".join(self.lines),
            ended - self.started,
            value,
            self.killed,
        )


def _wait(children: list[_Child], timeout: float, heartbeat: int) -> None:
    """Wait for every child; after a failure, give the rest time to notice, then
    kill. Nothing outlives ``timeout`` (plus a few seconds for the children's
    own watchdogs to report)."""
    deadline = time.monotonic() + timeout + 5
    first_failure: float | None = None
    # A survivor notices a dead peer within a heartbeat timeout or two, or at
    # the shutdown barrier; after that it is stuck, not slow.
    grace = 3 * heartbeat + 10
    try:
        while True:
            codes = [c.poll() for c in children]
            if all(code is not None for code in codes):
                return
            now = time.monotonic()
            if first_failure is None and any(code not in (None, 0) for code in codes):
                first_failure = now
            if now > deadline or (
                first_failure is not None and now > first_failure + grace
            ):
                break
            time.sleep(0.05)
    finally:
        for child in children:
            child.kill()


# What a process prints when it stops because a peer died: the coordinator's
# heartbeat verdict, or a collective whose peer socket went away.
_PEER_FAILURE = re.compile(
    r"by peer|Socket closed|another task died|stopped sending heartbeats|"
    r"leader task was preempted|Gloo \S+ failed|detected fatal errors"
)


def _first_failure_first(
    failed: list[ProcessResult], children: list[_Child]
) -> list[ProcessResult]:
    """Failed processes, the one that caused the failure first.

    By exit time; but a survivor can exit within milliseconds of the peer
    whose death it reports, so among processes that exited within a second of
    the first, one that does not report a peer's failure comes first.
    """
    failed = sorted(failed, key=lambda r: children[r.process_id].ended or 0.0)
    if not failed:
        return failed
    t0 = children[failed[0].process_id].ended or 0.0
    for i, r in enumerate(failed):
        if (children[r.process_id].ended or 0.0) > t0 + 1.0:
            break
        if r.returncode != -signal.SIGABRT and not _PEER_FAILURE.search(r.output):
            return [r, *failed[:i], *failed[i + 1 :]]
    return failed


def _failure_message(
    launch: LaunchResult, children: list[_Child], timeout: float
) -> str:
    results = launch.processes
    n = len(results)
    failed = [r for r in results if not r.ok]
    ended = _first_failure_first(
        [r for r in failed if not r.killed_by_launcher], children
    )
    # The first to fail shows its output first: its error is the cause.
    failed = ended + [r for r in failed if r.killed_by_launcher]
    lines = []
    if ended:
        first = ended[0]
        lines.append(
            f"process {first.process_id} of {n} failed first: {first.how()} "
            f"after {first.seconds:.1f} s."
        )
    else:
        lines.append(
            f"the job of {n} processes ran out of time ({timeout:.0f} s): no "
            "process failed, some never finished (a hang, or a timeout too short)."
        )
    for r in results:
        if ended and r is ended[0]:
            continue
        lines.append(f"  process {r.process_id}: {r.how()} after {r.seconds:.1f} s")
    for r in failed:
        tail = r.output.splitlines()[-_TAIL_LINES:]
        lines.append(f"--- output of process {r.process_id} ({r.how()}) ---")
        lines += [f"[process {r.process_id}] {line}" for line in tail] or [
            f"[process {r.process_id}] <no output>"
        ]
    return "\n".join(lines)
