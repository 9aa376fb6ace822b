"""Migration between optax states and shardopt Optimizers, and from optax checkpoints.

The mapping is by path, not by optimizer. A state is flattened to its array
leaves, each named by its path of field names, dict keys and chain positions
(``0/mu/layers/1/weight``). The catalogue's optimizers chain the same transforms
in the same order as optax's and name their state fields as optax does (``mu``,
``nu``, ``trace``, ``sum_of_squares``, ``inner_state``), so every moment has the
same path on both sides; optax's ``EmptyState`` and ``MaskedNode`` have no
leaves, nor have shardopt's ``None`` at masked-out leaves.

What remains are counts: shardopt keeps an int32 ``count`` in every transform
with a hyperparameter and in the Optimizer, optax only in some (Adam, Lion, a
schedule). A count that optax does not keep takes the one count optax has (they
agree when optax stepped its chain as a whole), or the ``count=`` given.
Anything else without a counterpart is an error that lists the paths.
"""

from __future__ import annotations

import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree

from .._optimizer import Optimizer
from .._tree import distinct_buffers
from ._errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    mismatch_message,
)
from ._record import Restored
from ._tree import abstract_target, find_mesh, from_nested, nested_paths, replicated

COUNT = "count"
# optax's Adan names its step count ``t``
COUNT_NAMES = (COUNT, "t")
# optax's optimistic gradient keeps ``count == 0`` as a bool instead of a count
INITIAL_STEP = "is_initial_step"
UNMAPPED_HINT = (
    "  Is the optax optimizer the equivalent of the shardopt one (the same "
    "transforms chained in the same order, the same mask, the same mu_dtype)? "
    "Build both from the same catalogue constructor and arguments, e.g. "
    "optax.adamw(...) and shardopt.adamw(...)."
)


def _is_count(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in (*COUNT_NAMES, INITIAL_STEP)


def _is_initial_step(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == INITIAL_STEP


def _flat(tree: PyTree) -> dict[str, Any]:
    """``path -> leaf`` for every array-like leaf (``None`` and empty states drop)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, leaf in flat:
        if leaf is None:
            continue
        out["/".join(_key(k) for k in path)] = leaf
    return out


def _key(entry: Any) -> str:
    for name in ("name", "key", "idx"):
        if hasattr(entry, name):
            return str(getattr(entry, name))
    return str(entry)


def _describe(x: Any) -> str:
    return f"{np.dtype(x.dtype).name}[{','.join(str(d) for d in x.shape)}]"


def _plan(
    ours: dict[str, Any], theirs: dict[str, Any], direction: str
) -> dict[str, str | None]:
    """For each of ``ours`` the path in ``theirs`` it comes from (None: a count).

    Raises :class:`CheckpointMismatchError` listing every leaf without a
    counterpart and every pair that differs in shape or dtype.
    """
    plan: dict[str, str | None] = {}
    missing, changed = [], []
    for path, leaf in ours.items():
        if path in theirs:
            other = theirs[path]
            same_shape = tuple(other.shape) == tuple(leaf.shape)
            same_dtype = np.dtype(other.dtype) == np.dtype(leaf.dtype)
            if not same_shape or not (same_dtype or _is_count(path)):
                changed.append(
                    f"{path}: optax {_describe(other)}, shardopt {_describe(leaf)}"
                    if direction == "from"
                    else f"{path}: shardopt {_describe(other)}, optax {_describe(leaf)}"
                )
            plan[path] = path
        elif _is_count(path):
            plan[path] = None
        else:
            missing.append(path)
    extra = sorted(p for p in theirs if p not in plan and not _is_count(p))
    if missing or extra or changed:
        src, dst = (
            ("optax", "shardopt") if direction == "from" else ("shardopt", "optax")
        )
        lines = [f"cannot map the {src} state onto the {dst} one:"]
        if extra:
            lines.append(f"  in the {src} state but not the {dst} one: {_list(extra)}")
        if missing:
            lines.append(
                f"  in the {dst} state but not the {src} one: {_list(missing)}"
            )
        if changed:
            lines.append(f"  different shape or dtype: {_list(changed)}")
        lines.append(UNMAPPED_HINT)
        raise CheckpointMismatchError("\n".join(lines))
    return plan


def _list(items: list[str], limit: int = 20) -> str:
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" (and {more} more)" if more > 0 else "")


def _the_count(theirs: dict[str, Any], count: Any) -> jax.Array:
    """The explicit ``count``, else the one value of every count in ``theirs``."""
    if count is not None:
        return jnp.asarray(count, jnp.int32)
    values = {
        p: int(np.asarray(x))
        for p, x in theirs.items()
        if _is_count(p) and not _is_initial_step(p)
    }
    distinct = sorted(set(values.values()))
    if len(distinct) == 1:
        return jnp.asarray(distinct[0], jnp.int32)
    if not distinct:
        raise ValueError(
            "the optax state keeps no step count (e.g. optax.sgd without a "
            "schedule); pass count=<the number of steps taken>"
        )
    shown = ", ".join(f"{p}={v}" for p, v in values.items())
    raise ValueError(
        f"the optax state's counts disagree ({shown}); pass count= to choose the "
        "Optimizer's step count"
    )


def _place(value: Any, like: Any) -> jax.Array:
    """``value`` as an array in ``like``'s dtype and, where it has one, sharding."""
    value = jnp.asarray(value, dtype=like.dtype)
    sharding = getattr(like, "sharding", None)
    return value if sharding is None else jax.device_put(value, sharding)


def from_optax(optax_state: PyTree, like: Optimizer, *, count: Any = None) -> Optimizer:
    """The shardopt Optimizer holding the moments and counts of an optax state.

    ``like`` is the shardopt Optimizer the training continues with (concrete or
    built on ``jax.ShapeDtypeStruct`` parameters): its transform and structure
    are kept, its state and count replaced, each array placed with ``like``'s
    sharding where it has one.

    Example::

        params = {"w": jnp.ones((4, 2))}
        optax_state = optax.adamw(1e-3, weight_decay=0.1).init(params)
        like = shardopt.Optimizer(shardopt.adamw(1e-3, weight_decay=0.1), params)
        opt = shardopt.checkpoint.from_optax(optax_state, like=like)

    Args:
        optax_state: the state from ``tx.init``/``tx.update`` of the optax
            optimizer equivalent to ``like``'s transform.
        like: the target Optimizer.
        count: the step count for the counts optax does not keep (by default
            the one count the optax state has).

    Raises:
        CheckpointMismatchError: a leaf has no counterpart or another shape or
            dtype; the message lists the paths.
        ValueError: no count can be found (pass ``count=``).
    """
    if not isinstance(like, Optimizer):
        raise TypeError(f"like must be a shardopt.Optimizer, got {type(like)}")
    theirs = _flat(optax_state)
    return _fill_optimizer(like, theirs, count)


def _fill_optimizer(like: Optimizer, theirs: dict[str, Any], count: Any) -> Optimizer:
    ours = _flat(eqx.filter(like.state, _is_arraylike))
    plan = _plan(ours, theirs, "from")
    default = _the_count(theirs, count)
    values = {
        path: _place(theirs[source] if source else default, ours[path])
        for path, source in plan.items()
    }
    state = from_nested(_nest(values), like.state) if values else like.state
    filled = like.replace_state(state, _place(default, like.count))
    # every count was placed from one array: give each leaf its own buffer
    return distinct_buffers(filled)


def _is_arraylike(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        *head, last = path.split("/")
        node = out
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    return out


def to_optax(opt: Optimizer, like: PyTree) -> PyTree:
    """The optax state of ``like``'s structure holding ``opt``'s moments and counts.

    ``like`` is a state of the equivalent optax optimizer, e.g. ``tx.init(params)``
    or ``jax.eval_shape(tx.init, params)``. Counts optax keeps take the matching
    shardopt count; shardopt's other counts are dropped.

    Raises:
        CheckpointMismatchError: a leaf has no counterpart (the paths are listed).
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"opt must be a shardopt.Optimizer, got {type(opt)}")
    ours = _flat(eqx.filter(opt.state, _is_arraylike))
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    theirs = {"/".join(_key(k) for k in path): leaf for path, leaf in flat}
    plan = _plan(theirs, ours, "to")

    def count_for(path: str) -> Any:
        return opt.count == 0 if _is_initial_step(path) else opt.count

    leaves = [
        _place(ours[source] if source else count_for(path), theirs[path])
        for path, source in plan.items()
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def restore_from_optax(
    directory: str | os.PathLike,
    *,
    opt: Optimizer,
    params: PyTree = None,
    step: int | None = None,
    params_key: str = "params",
    opt_state_key: str = "opt_state",
    count: Any = None,
) -> Restored:
    """Restore an optax checkpoint written with plain Orbax into a shardopt Optimizer.

    The checkpoint holds ``{params_key: params, opt_state_key: optax_state, ...}``
    saved with ``ocp.StandardCheckpointer`` (``directory`` is that checkpoint)
    or an ``ocp.CheckpointManager`` (``directory`` is its root, a step or an
    item directory; the latest step by default). The optax optimizer is not
    needed: its state's layout is read from the checkpoint and mapped by path
    onto ``opt`` (see :func:`from_optax`); each array is read straight into the
    layout of ``opt`` (and ``params``), onto any mesh. Other keys are ignored.

    Returns:
        :class:`Restored` with ``params`` (if a target was given) and ``opt``;
        ``step`` is the manager's step, or -1 for a single checkpoint.
    """
    abstract_hyperparameters = [
        "/".join(_key(k) for k in p)
        for p, x in jax.tree_util.tree_flatten_with_path(opt.transform)[0]
        if isinstance(x, jax.ShapeDtypeStruct)
    ]
    if abstract_hyperparameters:
        raise ValueError(
            "an optax checkpoint holds no hyperparameters, so opt's transform must "
            "be concrete; these are abstract: "
            f"{_list(abstract_hyperparameters)}. Build the target as "
            "Optimizer(shardopt.adamw(...), abstract_params): only its state and "
            "count may be ShapeDtypeStructs"
        )
    path, step_number = _item_directory(os.fspath(directory), step)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        saved = checkpointer.metadata(path).item_metadata.tree
    except Exception as err:
        raise CheckpointNotFoundError(
            f"{path} is not a readable Orbax checkpoint: {type(err).__name__}: {err}"
        ) from err
    for key in (opt_state_key, *([params_key] if params is not None else [])):
        if not isinstance(saved, dict) or key not in saved:
            keys = ", ".join(saved) if isinstance(saved, dict) else type(saved)
            raise CheckpointMismatchError(
                f"{path} holds no {key!r}; its top-level keys: {keys} "
                "(pass params_key= / opt_state_key=)"
            )
    theirs = {
        p: m for p, m in nested_paths(saved[opt_state_key]).items() if m is not None
    }
    ours = _flat(eqx.filter(opt.state, _is_arraylike))
    plan = _plan(ours, theirs, "from")
    mesh = find_mesh(params) or find_mesh(opt)
    placed = {p: t for p, t in nested_paths(abstract_target(opt.state, mesh)).items()}
    by_their_path = {source: placed[p] for p, source in plan.items() if source}

    def target(their_path: str, meta: Any) -> jax.ShapeDtypeStruct:
        if their_path in by_their_path:
            like = by_their_path[their_path]
            return jax.ShapeDtypeStruct(like.shape, like.dtype, sharding=like.sharding)
        return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=replicated(mesh))

    item = {opt_state_key: _rebuild(saved[opt_state_key], lambda p, m: target(p, m))}
    if params is not None:
        wanted = nested_paths(abstract_target(params, mesh))
        on_disk = {
            p: (tuple(m.shape), np.dtype(m.dtype).name)
            for p, m in nested_paths(saved[params_key]).items()
            if m is not None
        }
        message = mismatch_message(
            params_key,
            on_disk,
            {p: (tuple(x.shape), np.dtype(x.dtype).name) for p, x in wanted.items()},
        )
        if message:
            raise CheckpointMismatchError(f"{path}: {message}")
        item[params_key] = _rebuild(saved[params_key], lambda p, m: wanted[p])
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), item
    )
    got = checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(
            item, restore_args=restore_args, partial_restore=True
        ),
    )
    theirs_values = {
        p: v for p, v in nested_paths(got[opt_state_key]).items() if v is not None
    }
    out: dict[str, Any] = {
        "step": step_number,
        "opt": _fill_optimizer(opt, theirs_values, count),
    }
    if params is not None:
        out["params"] = from_nested(got[params_key], params)
    return Restored(**out)


def _rebuild(meta_tree: Any, leaf_fn, prefix: tuple[str, ...] = ()) -> Any:
    """``meta_tree``'s structure (dicts, lists, None) with ``leaf_fn(path, meta)``."""
    if isinstance(meta_tree, dict):
        return {
            k: _rebuild(v, leaf_fn, (*prefix, str(k))) for k, v in meta_tree.items()
        }
    if isinstance(meta_tree, (list, tuple)):
        return [
            _rebuild(v, leaf_fn, (*prefix, str(i))) for i, v in enumerate(meta_tree)
        ]
    if meta_tree is None:
        return None
    return leaf_fn("/".join(prefix), meta_tree)


def _item_directory(directory: str, step: int | None) -> tuple[str, int]:
    """The Orbax item directory holding the tree, and its step (-1 if none)."""
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"no checkpoint directory at {directory}")
    if os.path.exists(os.path.join(directory, "_METADATA")):
        return directory, -1
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    if steps:
        chosen = steps[-1] if step is None else int(step)
        if chosen not in steps:
            raise CheckpointNotFoundError(
                f"no step {step} in {directory}; steps present: {steps}"
            )
        directory = os.path.join(directory, str(chosen))
    else:
        chosen = -1
    items = [
        n
        for n in sorted(os.listdir(directory))
        if os.path.exists(os.path.join(directory, n, "_METADATA"))
    ]
    if len(items) != 1:
        raise CheckpointNotFoundError(
            f"{directory} holds {len(items)} Orbax items ({', '.join(items) or 'none'})"
            "; pass the directory of the one holding params and opt_state"
        )
    return os.path.join(directory, items[0]), chosen
