"""A checkpoint directory's housekeeping: one writer, no leftovers, no lost save.

- **One writer.** The first ``save`` of a manager takes ``.shardopt-writer``
  (created with ``O_EXCL``, holding the host and process id); a second live
  manager saving into the same directory gets :class:`CheckpointLockedError`
  instead of interleaving steps. A lock whose process is gone is taken over.
- **No leftovers.** A killed process leaves ``<step>.orbax-checkpoint-tmp*``
  directories (never visible as steps) and half-deleted old steps (Orbax renames
  a step into ``.shardopt-deleting`` before removing it, so deletion is atomic
  too). Opening a directory that no live writer holds removes both, and logs it.
- **No save lost on a normal exit.** A pending asynchronous save is finished
  by a hook that runs when the interpreter exits normally, before Python shuts
  down the thread pools Orbax needs (``threading``'s exit hooks run before
  ``atexit``'s). Managers are held strongly only while a save is pending.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (its exit hook must be registered first)
import contextlib
import glob
import json
import logging
import os
import shutil
import socket
import threading
import weakref
from typing import Any

from ._errors import CheckpointError, CheckpointLockedError

LOG = logging.getLogger("shardopt.checkpoint")
LOCK = ".shardopt-writer"
DELETING = ".shardopt-deleting"  # Orbax's todelete_subdir
TMP = "*.orbax-checkpoint-tmp*"

_PENDING: dict[int, Any] = {}  # id -> manager with a save in flight (strong)
_OPEN: weakref.WeakSet = weakref.WeakSet()  # managers holding a lock
_HELD: dict[str, int] = {}  # directory -> id of the manager in this process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(directory: str) -> dict | None:
    """The live writer of ``directory`` (``{"host", "pid"}``), if any."""
    try:
        with open(os.path.join(directory, LOCK)) as f:
            owner = json.load(f)
    except (OSError, ValueError):
        return None
    if owner.get("host") != socket.gethostname():
        return owner  # cannot tell: assume alive
    if owner.get("pid") == os.getpid():
        return owner if directory in _HELD else None
    return owner if _alive(int(owner.get("pid", -1))) else None


def acquire(directory: str, manager: Any) -> None:
    """Make ``manager`` the only writer of ``directory``, or raise."""
    if _HELD.get(directory) == id(manager):
        return
    path = os.path.join(directory, LOCK)
    owner = holder(directory)
    if owner is not None:
        where = (
            "another CheckpointManager of this process"
            if owner.get("pid") == os.getpid()
            else f"process {owner.get('pid')} on {owner.get('host')}"
        )
        raise CheckpointLockedError(
            f"{directory} is being written by {where} (lock file {path}); two "
            "writers would interleave their steps. Close the other manager, or "
            "save into another directory. If that process is gone, delete the "
            "lock file."
        )
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # stale: its process is gone
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    except FileExistsError:
        raise CheckpointLockedError(
            f"{directory} was just taken by another writer (lock file {path})"
        ) from None
    except OSError as err:
        raise CheckpointError(
            f"cannot save into {directory}: {err.strerror} (a read-only directory "
            "or file system?); nothing was written"
        ) from err
    _HELD[directory] = id(manager)
    _OPEN.add(manager)
    weakref.finalize(manager, release, directory, id(manager))


def release(directory: str, manager_id: int) -> None:
    """Give up the lock of ``directory`` if this manager holds it."""
    if _HELD.get(directory) != manager_id:
        return
    del _HELD[directory]
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, LOCK))


def remove_leftovers(directory: str, *, quiet: bool = False) -> list[str]:
    """Remove partial steps and half-deleted ones, unless a live writer works here."""
    if holder(directory) is not None:
        return []
    found = sorted(glob.glob(os.path.join(directory, TMP)))
    if os.path.exists(os.path.join(directory, LOCK)):
        found.append(os.path.join(directory, LOCK))  # its process is gone
    deleting = os.path.join(directory, DELETING)
    if os.path.isdir(deleting):
        found += [os.path.join(deleting, name) for name in os.listdir(deleting)]
    for path in found:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    if found and not quiet:
        names = ", ".join(os.path.relpath(p, directory) for p in found)
        LOG.warning(
            "removed %d leftover(s) of an interrupted save or deletion in %s: %s",
            len(found),
            directory,
            names,
        )
    return found


def pending(manager: Any) -> None:
    """Hold ``manager`` until its save is written (see :func:`_at_exit`)."""
    _PENDING[id(manager)] = manager


def settled(manager: Any) -> None:
    _PENDING.pop(id(manager), None)


def _at_exit() -> None:
    for manager in list(_PENDING.values()):
        step = manager._pending
        LOG.warning(
            "waiting for the asynchronous save of step %s to %s to finish "
            "before the interpreter exits",
            step,
            manager.directory,
        )
        try:
            manager.wait()
        except Exception as err:  # exiting: report, do not raise
            LOG.error("%s", err)
        else:
            LOG.warning("step %s is saved in %s", step, manager.directory)
    for manager in list(_OPEN):
        release(manager.directory, id(manager))


threading._register_atexit(_at_exit)  # type: ignore[attr-defined]
