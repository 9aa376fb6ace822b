"""An Orbax item that writes checksums in the background, inside the same commit.

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
from orbax.checkpoint import checkpoint_args
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.handlers import async_checkpoint_handler

from ._checksum import compute


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
