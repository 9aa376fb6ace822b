"""Orbax handlers: checksums written inside the same commit; the manager's items.

The checksums of a step's arrays are started on device before ``save``
returns and written by Orbax's background thread before the step directory is
renamed into place, so a step is never visible without them, and ``save``
does not wait for them. Every process writes the partial sums of its own
shards; readers add the parts up.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_args, type_handlers
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.handlers import async_checkpoint_handler

from ._checksum import compute
from ._reads import ReadHookArrayHandler


class ChecksumHandler(async_checkpoint_handler.AsyncCheckpointHandler):
    """Writes ``partial_<process>.json``: the checksums of this process's shards."""

    async def _write(self, shards: list, directory: Any) -> None:
        write(compute(shards), os.fspath(directory))

    async def async_save(self, directory, args: ChecksumSave):
        return [
            future.CommitFutureAwaitingContractedSignals(
                self._write(args.parts, directory), name="shardopt_checksums"
            )
        ]

    def save(self, directory, args: ChecksumSave):
        write(compute(args.parts), os.fspath(directory))

    def restore(self, directory, args: ChecksumRestore | None = None) -> list:
        return read_checksums(os.fspath(directory))


def write(records: list, directory: str) -> None:
    path = os.path.join(directory, f"partial_{jax.process_index()}.json")
    with open(path, "w") as f:
        json.dump(records, f)


def read_checksums(directory: str) -> list[dict]:
    """The shard checksums written by every process."""
    files = sorted(glob.glob(os.path.join(directory, "partial_*.json")))
    if not files:
        raise FileNotFoundError(f"no checksums in {directory}")
    partials = []
    for name in files:
        with open(name) as f:
            partials += json.load(f)
    return partials


@checkpoint_args.register_with_handler(ChecksumHandler, for_save=True)
@dataclasses.dataclass
class ChecksumSave(checkpoint_args.CheckpointArgs):
    parts: list


@checkpoint_args.register_with_handler(ChecksumHandler, for_restore=True)
@dataclasses.dataclass
class ChecksumRestore(checkpoint_args.CheckpointArgs):
    pass


def item_handlers(arrays: str, meta: str, reader: ReadHookArrayHandler) -> dict:
    """The manager's items: the arrays (Orbax's PyTree handler with ``reader``
    for jax.Array), the checksums and the JSON record."""
    registry = type_handlers.create_type_handler_registry(
        (int, type_handlers.ScalarHandler()),
        (float, type_handlers.ScalarHandler()),
        (np.number, type_handlers.ScalarHandler()),
        (np.ndarray, type_handlers.NumpyHandler()),
        (jax.Array, reader),
        (str, type_handlers.StringHandler()),
    )
    return {
        arrays: ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
        "checksums": ChecksumHandler(),
        meta: ocp.JsonCheckpointHandler(),
    }


def load_checksums(manager: ocp.CheckpointManager, directory: str, step: int) -> list:
    """The checksum records of a step: the files directly (a second Orbax
    restore costs ~2 ms), through Orbax where they are not local files."""
    path = os.path.join(directory, str(step), "checksums")
    if os.path.isdir(path):
        return read_checksums(path)
    args = ocp.args.Composite(checksums=ChecksumRestore())
    return manager.restore(step, args=args)["checksums"]
