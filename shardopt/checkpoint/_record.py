"""What a step records and what a restore returns; checks of save and restore input."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

from .._optimizer import Optimizer
from .._tree import distinct_buffers
from ._errors import CheckpointMismatchError, mismatch_message
from ._tree import find_mesh, nested_paths, to_nested

KEEP_HYPERPARAMETERS_HINT = (
    "  The optimizer's transform differs from the saved one (another optimizer, or "
    "a float that became a schedule?). To keep the moments and the count with the "
    "target's hyperparameters, pass keep_hyperparameters=True."
)


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :meth:`CheckpointManager.restore` read: ``None`` for what was not asked.

    ``params`` and ``opt`` have the structure and the shardings of the targets
    that were passed; ``rng`` is the PRNG key, ``data`` the data-loader position
    and ``metadata`` the JSON dict given to ``save``. No two array leaves of
    ``params``, ``opt`` and ``rng`` share a device buffer, so the whole result
    can be donated to the next step.
    """

    step: int
    params: PyTree = None
    opt: Optimizer | None = None
    rng: jax.Array | None = None
    data: Any = None
    metadata: dict | None = None

    def __post_init__(self):
        params, opt, rng = distinct_buffers((self.params, self.opt, self.rng))
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "opt", opt)
        object.__setattr__(self, "rng", rng)


def check_save_args(
    params: PyTree, opt: Any, rng: Any, data: Any, metadata: Any
) -> None:
    """Raise, naming the argument, for anything ``save`` cannot store."""
    if params is None and opt is None and rng is None:
        raise ValueError("nothing to save: pass params=, opt= or rng=")
    if params is not None and not to_nested(params):
        raise ValueError(
            f"params has no array leaves to save (got {type(params).__name__})"
        )
    if opt is not None and not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be a shardopt.Optimizer, got {type(opt)}")
    if rng is not None and not isinstance(rng, jax.Array):
        raise TypeError(
            f"rng must be a JAX PRNG key (jax.random.key), got {type(rng).__name__}"
        )
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    for name, value in (("data", data), ("metadata", metadata)):
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be JSON-serialisable: {err}") from err


def check_targets(
    step: int, directory: str, saved_leaves: dict, targets: dict[str, dict]
) -> None:
    """Raise :class:`CheckpointMismatchError` listing how targets and step differ."""
    for name, target in targets.items():
        saved = {
            p: (tuple(d["shape"]), d["dtype"])
            for p, d in saved_leaves.get(name, {}).items()
        }
        if name not in saved_leaves and target:
            raise CheckpointMismatchError(
                f"step {step} in {directory} holds no {name!r}; it has "
                f"{', '.join(k for k in saved_leaves if saved_leaves[k])}"
            )
        wanted = {
            p: (tuple(x.shape), np.dtype(x.dtype).name)
            for p, x in nested_paths(target).items()
        }
        hint = KEEP_HYPERPARAMETERS_HINT if name == "opt_hyperparameters" else ""
        message = mismatch_message(name, saved, wanted, hint)
        if message:
            raise CheckpointMismatchError(f"step {step} in {directory}: {message}")


def layout(params: PyTree, opt: Optimizer | None) -> dict:
    """What the step was saved from: processes, devices, meshes and plan."""
    meshes = []
    for tree in (params, opt):
        mesh = find_mesh(tree) if tree is not None else None
        if mesh is not None:
            entry = {"axes": {str(k): int(v) for k, v in mesh.shape.items()}}
            if entry not in meshes:
                meshes.append(entry)
    layout: dict[str, Any] = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "meshes": meshes,
    }
    plan = getattr(opt, "plan", None)
    if plan is not None:
        layout["plan"] = repr(plan)
    return layout


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
