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

from ._checksum import add_partials, combine


class ChecksumHandler(async_checkpoint_handler.AsyncCheckpointHandler):
    """Writes ``partial_<process>.json``: this process's checksum parts."""

    async def _write(self, parts: list, directory: Any) -> None:
        sums = combine(parts)
        path = os.path.join(os.fspath(directory), f"partial_{jax.process_index()}.json")
        with open(path, "w") as f:
            json.dump(sums, f)

    async def async_save(self, directory, args: ChecksumSave):
        return [
            future.CommitFutureAwaitingContractedSignals(
                self._write(args.parts, directory), name="shardopt_checksums"
            )
        ]

    def save(self, directory, args: ChecksumSave):
        combine_now = combine(args.parts)
        path = os.path.join(os.fspath(directory), f"partial_{jax.process_index()}.json")
        with open(path, "w") as f:
            json.dump(combine_now, f)

    def restore(self, directory, args: ChecksumRestore | None = None) -> list:
        return read_checksums(os.fspath(directory))


def read_checksums(directory: str) -> list[list[int]]:
    """Add up the partial checksums written by every process."""
    files = sorted(glob.glob(os.path.join(directory, "partial_*.json")))
    if not files:
        raise FileNotFoundError(f"no checksums in {directory}")
    partials = []
    for name in files:
        with open(name) as f:
            partials.append(json.load(f))
    return add_partials(partials)


@checkpoint_args.register_with_handler(ChecksumHandler, for_save=True)
@dataclasses.dataclass
class ChecksumSave(checkpoint_args.CheckpointArgs):
    parts: list


@checkpoint_args.register_with_handler(ChecksumHandler, for_restore=True)
@dataclasses.dataclass
class ChecksumRestore(checkpoint_args.CheckpointArgs):
    pass
