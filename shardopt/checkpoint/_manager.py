"""CheckpointManager: params, Optimizer and extras through Orbax, onto any mesh."""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree

from .._hyperparams import as_count
from .._optimizer import Optimizer
from ..distributed._multihost import gather_texts
from . import _housekeeping as house
from ._checksum import collect
from ._errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)
from ._handler import ChecksumSave, item_handlers, load_checksums
from ._reads import ReadHookArrayHandler
from ._record import (
    Restored,
    check_save_args,
    check_targets,
    first_line,
    layout,
)
from ._tree import (
    Nested,
    abstract_target,
    describe_sharding,
    empty_like,
    find_mesh,
    for_saving,
    from_nested,
    nested_paths,
    put_path,
    replicated,
    split_empty,
    to_nested,
)
from ._verify import Verifier, read_error

FORMAT = "shardopt-checkpoint/2"
META = "shardopt"
ARRAYS = "arrays"  # one Orbax item holding the parts below: one write, one read
ARRAY_ITEMS = ("params", "opt_state", "opt_hyperparameters", "extras")
ITEMS = (ARRAYS, "checksums", META)
EMPTY_MARK = "_only_empty_arrays"  # what is written when every array is empty


class CheckpointManager:
    """Save and restore parameters, an Optimizer and extras with Orbax.

    Each step is one directory holding Orbax items: ``params``, ``opt_state``
    (the transform's state and the count), ``opt_hyperparameters`` (the array
    leaves of the transform), ``extras`` (the PRNG key and checksums of every
    array) and ``shardopt`` (JSON: metadata, data-loader position, every leaf's
    shape, dtype and the layout it was saved from). Saving is asynchronous by
    default: ``save`` returns once the arrays are copied to host memory, and a
    step becomes visible (to ``latest_step`` and to restore) only when fully
    written, since Orbax writes into a temporary directory and renames it.

    ``restore`` takes target ("like") trees: live arrays or
    ``jax.ShapeDtypeStruct`` with shardings. Every array is read straight into
    the target's layout, so a checkpoint saved on one mesh restores onto any
    other mesh, device count, ZeRO stage or number of processes.

    Example::

        params = {"w": jnp.ones((4, 2))}
        opt = shardopt.Optimizer(shardopt.adamw(1e-3), params)
        with shardopt.CheckpointManager("ckpt", max_to_keep=3) as ckpt:
            ckpt.save(1, params=params, opt=opt, data={"batch": 120})
            ckpt.wait()
            got = ckpt.restore(params=params, opt=opt)  # or abstract targets
        params, opt = got.params, got.opt

    Args:
        directory: where the steps go; created unless ``create=False``.
        max_to_keep: how many of the latest steps to keep (``None``: all).
        keep_every: also keep every step that is a multiple of this.
        async_save: write in a background thread (default) or block in ``save``.
        create: create ``directory`` if missing; otherwise a missing directory
            raises :class:`CheckpointNotFoundError`.
        checksums: record every shard's CRC-32 at save (in Orbax's background
            thread, so ``save`` does not wait for it), checked by every
            ``restore`` and by ``shardopt-ckpt verify``.

    A pending asynchronous save is finished when the interpreter exits
    normally, without ``close()``; only one live manager may save into a
    directory (:class:`CheckpointLockedError`); the partial steps a killed
    process leaves are removed when a manager next opens the directory. See
    ``docs/reliability.md``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        keep_every: int | None = None,
        async_save: bool = True,
        create: bool = True,
        checksums: bool = True,
    ):
        if max_to_keep is not None:
            max_to_keep = as_count(max_to_keep, name="max_to_keep", low=1)
        if keep_every is not None:
            keep_every = as_count(keep_every, name="keep_every", low=1)
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}")
        self.directory = os.path.abspath(os.fspath(directory))
        if not create and not os.path.isdir(self.directory):
            raise CheckpointNotFoundError(
                f"no checkpoint directory at {self.directory}"
            )
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointNotFoundError(f"{self.directory} is not a directory")
        policies: list[Any] = []
        if max_to_keep is not None:
            policies.append(ocp.checkpoint_managers.LatestN(n=max_to_keep))
        if keep_every is not None:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
        policy = (
            ocp.checkpoint_managers.AnyPreservationPolicy(policies)
            if policies
            else None
        )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            create=create,
            cleanup_tmp_directories=False,  # done below, synchronously
            todelete_subdir=house.DELETING,  # an old step goes away atomically
            preservation_policy=policy,
        )
        # the arrays' reader hands each shard to the checksum check once read
        self._reader = ReadHookArrayHandler()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers=item_handlers(ARRAYS, META, self._reader),
        )
        if jax.process_index() == 0 and os.path.isdir(self.directory):
            house.remove_leftovers(self.directory)
        self._pending: int | None = None
        self._checksums = checksums

    # ------------------------------------------------------------------ steps
    def all_steps(self) -> list[int]:
        """The steps fully written, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest fully written step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def wait(self) -> None:
        """Block until the pending asynchronous save is written.

        Raises :class:`CheckpointError` if it failed (a full disk, say): its
        partial directory is removed and the steps saved before are untouched.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            step, self._pending = self._pending, None
            house.settled(self)
            self._remove_partial(step)
            raise CheckpointError(
                f"saving step {step} to {self.directory} failed: "
                f"{type(err).__name__}: {first_line(err)}. Nothing of step {step} "
                f"was kept; the steps saved before are intact: {self.all_steps()}"
            ) from err
        self._pending = None
        house.settled(self)
        if jax.process_index() == 0:  # old steps Orbax renamed away
            deleting = os.path.join(self.directory, house.DELETING)
            if os.path.isdir(deleting):
                shutil.rmtree(deleting, ignore_errors=True)

    def close(self) -> None:
        """Wait for pending saves (raising if one failed), then release resources."""
        try:
            self.wait()
        finally:
            self._manager.close()
            house.release(self.directory, id(self))

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _remove_partial(self, step: int | None) -> None:
        if step is None or jax.process_index() != 0:
            return
        pattern = os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")
        for path in glob.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        *,
        params: PyTree = None,
        opt: Optimizer | None = None,
        rng: jax.Array | None = None,
        data: Any = None,
        metadata: dict | None = None,
    ) -> None:
        """Save a step; returns once the arrays are copied (async) or written.

        Args:
            step: the step number; saving a step that exists raises.
            params: the parameters (any pytree; non-array leaves are skipped).
            opt: the Optimizer: its state, count and hyperparameters.
            rng: a PRNG key (typed or raw ``uint32``).
            data: a JSON value, e.g. the data loader's position.
            metadata: a JSON dict stored with the step, shown by ``inspect``.
        """
        step = as_count(step, name="step")
        check_save_args(params, opt, rng, data, metadata)
        if step in self._manager.all_steps():
            raise CheckpointError(
                f"step {step} already exists in {self.directory}; it is not "
                "overwritten (delete it first, or save under another step)"
            )
        self.wait()  # surface a failed previous save before starting another
        if jax.process_index() == 0:
            house.acquire(self.directory, self)

        items: dict[str, dict] = {}
        if params is not None:
            items["params"] = to_nested(params)
        if opt is not None:
            items["opt_state"] = to_nested({"state": opt.state, "count": opt.count})
            items["opt_hyperparameters"] = to_nested(opt.transform)
        rng_impl = None
        extras: dict[str, Any] = {}
        if rng is not None:
            if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
                rng_impl = str(jax.random.key_impl(rng))
                rng = jax.random.key_data(rng)
            extras["rng"] = rng
        items = {name: for_saving(tree) for name, tree in items.items() if tree}
        extras = for_saving(extras)

        names, leaves, described = [], [], {}
        for name, tree in [*items.items(), ("extras", extras)]:
            described[name] = {}
            for path, leaf in nested_paths(tree).items():
                names.append(f"{name}/{path}")
                leaves.append(leaf)
                described[name][path] = {
                    "shape": list(leaf.shape),
                    "dtype": np.dtype(leaf.dtype).name,
                    "bytes": int(leaf.size * np.dtype(leaf.dtype).itemsize),
                    "layout": describe_sharding(leaf.sharding),
                }
        parts = collect(leaves) if self._checksums else []

        meta = {
            "format": FORMAT,
            "step": step,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "metadata": metadata if metadata is not None else {},
            "data": data,
            "rng_impl": rng_impl,
            "layout": layout(params, opt),
            "leaves": described,
            "checksum_order": names,
            "checksums": self._checksums,
        }
        if extras:
            items["extras"] = extras
        # zero-size leaves are in the record only (Orbax cannot write them)
        items = {name: split_empty(tree)[0] for name, tree in items.items()}
        items = {name: tree for name, tree in items.items() if tree}
        if not items:
            items = {"extras": {EMPTY_MARK: jax.numpy.zeros((), np.int8)}}
        # One PyTree item for all arrays: each Orbax item costs its own
        # serialisation pass and threads (measured: 4 items block ~0.1 s longer).
        args: dict[str, Any] = {ARRAYS: ocp.args.PyTreeSave(items)}
        if self._checksums:
            args["checksums"] = ChecksumSave(parts)
        args[META] = ocp.args.JsonSave(meta)
        self._pending = step
        house.pending(self)
        try:
            self._manager.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as err:
            self._pending = None
            house.settled(self)
            with contextlib.suppress(Exception):  # let its threads stop first
                self._manager.wait_until_finished()
            self._remove_partial(step)
            raise CheckpointError(
                f"saving step {step} to {self.directory} failed: "
                f"{type(err).__name__}: {first_line(err)}"
            ) from err

    # ---------------------------------------------------------------- restore
    def metadata(self, step: int | None = None) -> dict:
        """The JSON record of a step: metadata, data, every leaf and its layout."""
        step = self._resolve(step)
        # the JSON file directly: a second Orbax restore per restore costs ~20 ms
        path = os.path.join(self.directory, str(step), META, "metadata")
        try:
            if os.path.isfile(path):
                with open(path) as f:
                    got = {META: json.load(f)}
            else:
                got = self._manager.restore(
                    step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()})
                )
        except Exception as err:
            raise CheckpointError(
                f"step {step} in {self.directory} has no readable shardopt record "
                f"{os.path.relpath(path, self.directory)} "
                f"({type(err).__name__}: {first_line(err)}); was it saved by "
                "shardopt.checkpoint?"
            ) from err
        meta = got[META]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(
                f"step {step} in {self.directory} is not a {FORMAT} checkpoint"
            )
        return meta

    def restore(
        self,
        step: int | None = None,
        *,
        params: PyTree = None,
        opt: Optimizer | None = None,
        keep_hyperparameters: bool = False,
        verify: bool | None = None,
        fallback: bool = False,
    ) -> Restored:
        """Restore a step (the latest by default) into the layout of the targets.

        Only what is asked for is read: pass ``params`` alone for evaluation
        without building an optimizer. Each target is a tree of live arrays or
        ``jax.ShapeDtypeStruct`` with shardings (e.g. ``eqx.filter_eval_shape``
        plus the plan's shardings); scalars without a NamedSharding are
        replicated over the targets' mesh.

        Args:
            step: the step; the latest fully written one by default.
            params: the target for the parameters.
            opt: the target Optimizer (concrete or abstract).
            keep_hyperparameters: keep ``opt``'s transform (a new learning rate
                or schedule) and restore only its state and count.
            verify: compare every array read with the checksums recorded at
                save (each process the slices it read, in a thread pool, each
                group of arrays as soon as it is read while the others still
                are; the cost is measured by ``scripts/bench_checkpoint.py``
                and stated in ``docs/reliability.md``). ``None``
                (default): whenever the step has checksums; ``True``: also
                raise if it has none; ``False``: skip the check.
            fallback: if the step is corrupted, restore the newest intact
                step before it instead, and log which.

        Raises:
            CheckpointNotFoundError: no such directory or step.
            CheckpointMismatchError: the targets' leaves differ from the saved
                ones (the message lists the paths).
            CorruptCheckpointError (ChecksumError): an array file of the step
                is truncated or differs from the save; the message names the
                step, the array and the file, and the newest intact step.
        """
        step = self._resolve(step)
        args = (params, opt, keep_hyperparameters, verify)
        try:
            return self._restore_step(step, *args)
        except CorruptCheckpointError as err:
            intact = None
            for earlier in reversed([s for s in self.all_steps() if s < step]):
                try:
                    intact = self._restore_step(earlier, *args)
                    break
                except (CorruptCheckpointError, CheckpointMismatchError):
                    continue
            if intact is None:
                raise type(err)(
                    f"{err}. No earlier step is intact either "
                    f"(steps present: {self.all_steps()})."
                ) from err
            if not fallback:
                raise type(err)(
                    f"{err}. The newest intact step is {intact.step}: restore it "
                    f"with restore({intact.step}, ...), or pass fallback=True."
                ) from err
            house.LOG.warning(
                "%s. Restored step %d instead, the newest intact step (fallback=True).",
                err,
                intact.step,
            )
            return intact

    def _restore_step(
        self,
        step: int,
        params: PyTree,
        opt: Optimizer | None,
        keep_hyperparameters: bool,
        verify: bool | None,
    ) -> Restored:
        meta = self.metadata(step)
        mesh = find_mesh(params) or find_mesh(opt)
        targets: dict[str, dict] = {}
        if params is not None:
            targets["params"] = abstract_target(params, mesh)
        if opt is not None:
            targets["opt_state"] = abstract_target(
                {"state": opt.state, "count": opt.count}, mesh
            )
            if not keep_hyperparameters:
                targets["opt_hyperparameters"] = abstract_target(opt.transform, mesh)
        saved_leaves = meta["leaves"]
        check_targets(step, self.directory, saved_leaves, targets)
        extras_target = {}
        if "rng" in saved_leaves.get("extras", {}):
            d = saved_leaves["extras"]["rng"]
            extras_target["rng"] = jax.ShapeDtypeStruct(
                tuple(d["shape"]), np.dtype(d["dtype"]), sharding=replicated(mesh)
            )
        recorded = meta.get("checksums", True)
        if verify and not recorded:
            raise CheckpointError(
                f"step {step} in {self.directory} was saved with checksums=False: "
                "there is nothing to verify against; restore with verify=False"
            )
        wanted = {name: target for name, target in targets.items() if target}
        if extras_target:
            wanted["extras"] = extras_target
        verify = recorded if verify is None else verify
        reads, empty = {}, {}
        for name, target in wanted.items():
            kept, found = split_empty(target)
            if kept:
                reads[name] = kept
            empty.update({f"{name}/{path}": x for path, x in found.items()})
        verifier = None
        try:
            if verify:  # the records first: each array is checked once read
                records = load_checksums(self._manager, self.directory, step)
                verifier = Verifier(step, self.directory, ARRAYS, meta, records)
                self._reader.sink = verifier
            got = self._read_arrays(step, reads) if reads else {}
            for path, target in empty.items():
                put_path(got, path, empty_like(target))
        except CheckpointError:
            raise
        except Exception as err:
            raise self._read_failure(err, step) from err
        finally:
            self._reader.sink = None
        if verifier is not None:
            verifier.finish({n: got[n] for n in wanted})

        out: dict[str, Any] = {"step": step, "data": meta["data"]}
        out["metadata"] = meta["metadata"]
        if params is not None:
            out["params"] = from_nested(
                got["params"] if targets["params"] else {}, params
            )
        if opt is not None:
            state = got["opt_state"] if targets["opt_state"] else {}
            transform = opt.transform
            if not keep_hyperparameters and targets["opt_hyperparameters"]:
                transform = from_nested(got["opt_hyperparameters"], opt.transform)
            # the per-leaf state is what is saved; a fused optimizer packs it
            restored = opt.replace_state(
                from_nested(state.get("state", {}), opt.state), state["count"]
            )
            out["opt"] = restored.replace_transform(transform)
        if "rng" in extras_target:
            rng = got["extras"]["rng"]
            if meta["rng_impl"] is not None:
                rng = jax.random.wrap_key_data(rng, impl=meta["rng_impl"])
            out["rng"] = rng
        return Restored(**out)

    def _read_failure(self, err: Exception, step: int) -> CheckpointError:
        """The error to raise for ``err``, a failed read of ``step``."""
        damaged = read_error(err, step, self.directory, ARRAYS)
        if damaged is not None:
            return damaged
        return CheckpointError(
            f"reading step {step} from {self.directory} failed: "
            f"{type(err).__name__}: {first_line(err)}. An array file may be "
            f"truncated or corrupted: run `shardopt-ckpt verify "
            f"{self.directory} --step {step}`"
        )

    def _agree_on_the_read(self, step: int) -> None:
        """In a job of several processes, raise on every process if the read
        failed on any (the reader kept its error): so that none goes on with
        the step, or falls back to an earlier one, alone. Every process
        raises the same class: ``CorruptCheckpointError`` (after which every
        process looks for an earlier intact step, reading together) only if
        every failed read was a damaged file, else ``CheckpointError``."""
        failed, self._reader.failed = self._reader.failed, None
        if jax.process_count() == 1:
            return
        error = None if failed is None else self._read_failure(failed, step)
        damaged = isinstance(error, CorruptCheckpointError)
        texts = gather_texts("" if error is None else f"{int(damaged)}{error}")
        found = {i: text[1:] for i, text in enumerate(texts) if text}
        if not found:
            return
        every_damaged = all(text[0] == "1" for text in texts if text)
        if error is not None and damaged == every_damaged:
            raise error from failed
        kind = CorruptCheckpointError if every_damaged else CheckpointError
        raise kind(  # and where this process's read was damaged, another's not
            f"step {step} in {self.directory} could not be read by every "
            f"process: {'; '.join(f'process {i}: {t}' for i, t in found.items())}"
        )

    def _read_arrays(self, step: int, targets: dict[str, Nested]) -> dict:
        """Read the parts of the arrays item that ``targets`` name, in their layout."""
        restore_args = jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(
                sharding=s.sharding, global_shape=s.shape, dtype=s.dtype
            ),
            targets,
        )
        got = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    ARRAYS: ocp.args.PyTreeRestore(
                        targets, restore_args=restore_args, partial_restore=True
                    )
                }
            ),
        )
        self._agree_on_the_read(step)
        return dict(got[ARRAYS])

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if not os.path.isdir(self.directory):
            raise CheckpointNotFoundError(
                f"no checkpoint directory at {self.directory}"
            )
        if step is None:
            if not steps:
                raise CheckpointNotFoundError(
                    f"no checkpoint in {self.directory}: the directory holds no "
                    "fully written step"
                )
            return steps[-1]
        step = as_count(step, name="step")
        if step not in steps:
            raise CheckpointNotFoundError(
                f"no step {step} in {self.directory}; steps present: {steps or 'none'}"
            )
        return int(step)
