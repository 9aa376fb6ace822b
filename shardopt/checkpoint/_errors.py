"""The errors a checkpoint operation raises, with the messages they carry."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found or read."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory or the step does not exist, or holds no checkpoint."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint does not hold the leaves the target tree needs."""


class CorruptCheckpointError(CheckpointError):
    """A step's files are damaged: truncated, or bytes that differ from the save.

    The message names the step, the item, the array and the file, and which
    earlier step is intact; ``restore(..., fallback=True)`` restores that one.
    """


class ChecksumError(CorruptCheckpointError):
    """An array read back differs from the one that was saved."""


class CheckpointLockedError(CheckpointError):
    """Another live manager is saving into the same directory."""


def mismatch_message(
    item: str,
    saved: dict[str, tuple[tuple[int, ...], str]],
    wanted: dict[str, tuple[tuple[int, ...], str]],
    hint: str = "",
) -> str | None:
    """A message listing how ``wanted`` differs from ``saved``; None if it does not."""
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    changed = [
        f"{path}: saved {_fmt(saved[path])}, target {_fmt(wanted[path])}"
        for path in sorted(set(saved) & set(wanted))
        if tuple(saved[path][0]) != tuple(wanted[path][0])
        or saved[path][1] != wanted[path][1]
    ]
    if not (missing or extra or changed):
        return None
    lines = [f"the checkpoint's {item!r} does not match the target tree:"]
    if missing:
        lines.append(f"  in the target but not in the checkpoint: {_list(missing)}")
    if extra:
        lines.append(f"  in the checkpoint but not in the target: {_list(extra)}")
    if changed:
        lines.append(f"  different shape or dtype: {_list(changed)}")
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def _fmt(shape_dtype: tuple) -> str:
    shape, dtype = shape_dtype
    return f"{dtype}[{','.join(str(d) for d in shape)}]"


def _list(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return shown + (f" (and {more} more)" if more > 0 else "")
