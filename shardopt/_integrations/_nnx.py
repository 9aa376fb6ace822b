"""Flax NNX: ``shardopt.nnx.Optimizer``, a drop-in for ``nnx.Optimizer``.

The optimizer is a :class:`shardopt.Optimizer` kept as NNX state: its
transform's arrays (hyperparameters), its state and its count become
``OptState`` Variables of an ``nnx.Pytree``, so ``nnx.jit``, ``nnx.state``,
``nnx.split`` / ``nnx.merge`` see them, while every step runs
:meth:`shardopt.Optimizer.step` (one state layout, one ZeRO implementation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
from flax import nnx
from flax.nnx.training.optimizer import OptArray, OptState
from jax.sharding import PartitionSpec

from .._optimizer import Optimizer as _Core
from .._tree import describe, path_str
from ..checkpoint._manager import CheckpointManager, Restored
from ..sharding._plan import ShardingPlan
from ._common import check_annotations, place, spec_tree, warn_if_unannotated

ALL_BUT_RNG_KEYS = nnx.Not(nnx.RngKey)  # what save / restore take by default
_IS_VARIABLE = lambda x: isinstance(x, nnx.Variable)

_AXIS_HINT = (
    "If these are logical axis names, give the rules: build the optimizer inside "
    "`with nn.logical_axis_rules(rules):` (flax.linen) or set the Variable's "
    "`sharding_rules` metadata; otherwise build the plan on a mesh with that axis."
)
_NOT_TRAINED = (
    "grads hold Variables this optimizer does not train (wrt={wrt}):\n{paths}\n"
    "Compute the gradients for the trained Variables only, e.g. "
    "nnx.grad(loss, argnums=nnx.DiffState(0, wrt)), or drop the rest with "
    "nnx.state(grads, wrt)."
)


def _paths(state: nnx.State) -> dict[str, nnx.Variable]:
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_IS_VARIABLE)[0]
    return {path_str(p): v for p, v in flat if isinstance(v, nnx.Variable)}


def optimizer_overrides(state: nnx.State, plan: ShardingPlan) -> ShardingPlan:
    """``plan`` with each Variable's ``optimizer_sharding`` metadata as an override.

    ``optimizer_sharding`` is NNX's way to give a parameter's optimizer state
    its own layout (``nnx.Optimizer`` lays the moments out with it); here it
    is the parameter's partitioned layout ``Z``: its mirrored state's, and
    from stage 2 its gradient's (stage 3: the parameter's too).
    """
    found = {}
    for path, var in _paths(state).items():
        names = var.get_metadata().get("optimizer_sharding")
        if names:
            spec = PartitionSpec(*names)
            annotation = f"optimizer_sharding={tuple(names)!r}"
            check_annotations(
                {path: spec},
                {path: var.get_value()},
                {path: annotation},
                plan,
                "Variable",
                _AXIS_HINT,
            )
            found[path] = spec
    if not found:
        return plan
    overrides = dict(plan.overrides)
    overrides.update(found)
    return dataclasses.replace(plan, overrides=tuple(sorted(overrides.items())))


def model_specs(state: nnx.State, plan: ShardingPlan) -> dict[str, PartitionSpec]:
    """``{path: PartitionSpec}`` for each Variable of ``state`` with an annotation.

    The annotation is the Variable's ``out_sharding`` (what
    ``nnx.with_partitioning`` and ``kernel_metadata`` set), translated through
    logical axis rules (the context's and the Variable's ``sharding_rules``) by
    flax's own ``nnx.get_partition_spec``. Raises for an axis the mesh lacks.
    """
    specs, leaves, annotations = {}, {}, {}
    for path, var in _paths(state).items():
        annotation = var.get_metadata().get("out_sharding")
        if not annotation:
            continue
        spec = nnx.get_partition_spec(var).get_value()
        specs[path] = spec
        leaves[path] = var.get_value()
        annotations[path] = f"out_sharding={tuple(annotation)!r}"
    what = "Variable"
    check_annotations(specs, leaves, annotations, plan, what, _AXIS_HINT)
    return specs


class Optimizer(nnx.Pytree):
    """``nnx.Optimizer`` with shardopt transforms and a ZeRO plan.

    ``Optimizer(model, tx, wrt=nnx.Param, plan=None)``: ``tx`` is any shardopt
    or optax transform, ``wrt`` an NNX filter for the Variables trained
    (``nnx.LoRAParam``, ``nnx.Not(...)``, ...), ``plan`` a
    :func:`shardopt.zero` plan. The plan starts from the model's own
    annotations (``out_sharding``, ``nnx.with_partitioning``, logical axis
    rules): the trained Variables are moved into the plan's parameter layout
    (partitioned over the data axes at stage 3) and the state is created in
    its layout; a Variable's ``optimizer_sharding`` metadata, where set, is
    its state's layout (a plan override). A model without any annotation is
    warned about once (:class:`UnannotatedModelWarning`) and starts
    replicated.

    ``optimizer.update(model, grads)`` applies one step in place, under
    ``nnx.jit`` or eagerly; ``optimizer.step`` counts steps. ``grads`` must hold
    exactly the trained Variables: a gradient for any other Variable (frozen
    or filtered out by ``wrt``) is an error naming its path.

    Example (``plan=shardopt.zero(1, mesh)`` partitions the moments)::

        from flax import nnx

        model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
        optimizer = shardopt.nnx.Optimizer(model, shardopt.adamw(1e-3), wrt=nnx.Param)
        loss_fn = lambda model, x, y: jnp.mean((model(x) - y) ** 2)

        @nnx.jit
        def train_step(model, optimizer, x, y):
            loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
            optimizer.update(model, grads)
            return loss

        loss = train_step(model, optimizer, jnp.ones((8, 4)), jnp.zeros((8, 2)))
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: Any,
        *,
        wrt: Any = nnx.Param,
        plan: ShardingPlan | None = None,
    ):
        state = nnx.state(model, wrt)
        params = nnx.to_pure_dict(state)
        if plan is not None:
            if not isinstance(plan, ShardingPlan):
                raise TypeError(
                    f"plan must be a ShardingPlan (shardopt.zero(...)), got "
                    f"{type(plan).__name__}"
                )
            specs = model_specs(state, plan)
            plan = optimizer_overrides(state, plan)
            warn_if_unannotated(
                params,
                specs,
                plan,
                what="the model",
                how="out_sharding / nnx.with_partitioning on its Variables",
                module="nnx",
            )
            params = place(params, plan, spec_tree(params, specs))
            nnx.replace_by_pure_dict(state, params)
            nnx.update(model, state)
        # fuse=False: opt_state's Variables are the per-leaf state users read
        # (opt_state[0].mu["w"]); flat buffers would hide it behind Packed nodes
        self._set_core(_Core(tx, params, plan=plan, fuse=False), fresh=True)
        self.wrt = wrt

    # ------------------------------------------------------------ the core
    def _set_core(self, core: _Core, fresh: bool = False) -> None:
        # the transform's array leaves are Variables; its other leaves (a
        # Python function given as a schedule, say) stay static, by position
        leaves = jax.tree.leaves(core.transform)
        arrays = [x for x in leaves if eqx.is_array(x)]
        if fresh:
            self.treedef = jax.tree.structure(core)
            self.constants = tuple(
                (i, x) for i, x in enumerate(leaves) if not eqx.is_array(x)
            )
            self.n_transform_leaves = len(leaves)
            self.hyperparameters = nnx.data([OptArray(x) for x in arrays])
            self.opt_state = nnx.data(jax.tree.map(OptArray, core.stored_state))
            self.step = OptState(core.count)
            self.plan = core.plan  # bound to the parameters' layout
            return
        if jax.tree.structure(core) != self.treedef:
            raise ValueError(
                "this optimizer's transform or state has another structure than "
                f"the one given:\n  {self.treedef}\n  {jax.tree.structure(core)}"
            )
        for var, x in zip(self.hyperparameters, arrays, strict=True):
            var.set_value(x)
        jax.tree.map(
            lambda v, x: v.set_value(x),
            self.opt_state,
            core.stored_state,
            is_leaf=_IS_VARIABLE,
        )
        self.step.set_value(core.count)

    def to_shardopt(self) -> _Core:
        """The :class:`shardopt.Optimizer` this holds (its current arrays)."""
        arrays = iter(v.get_value() for v in self.hyperparameters)
        constants = dict(self.constants)
        leaves = [
            constants[i] if i in constants else next(arrays)
            for i in range(self.n_transform_leaves)
        ]
        leaves += jax.tree.leaves(nnx.as_pure(self.opt_state))
        leaves.append(self.step.get_value())
        return jax.tree.unflatten(self.treedef, leaves)

    def load_shardopt(self, opt: _Core) -> None:
        """Set this optimizer's arrays from a :class:`shardopt.Optimizer` of the
        same structure (e.g. one restored from a checkpoint)."""
        self._set_core(opt)

    def set_hyperparameters(self, **values: Any) -> None:
        """Replace hyperparameters by name, in place (``learning_rate=1e-4``).

        As :meth:`shardopt.Optimizer.with_hyperparameters`: the state is kept,
        and a jitted step does not compile again unless a number becomes a
        schedule (a new structure; call this outside ``nnx.jit`` then).
        """
        core = self.to_shardopt().with_hyperparameters(**values)
        self._set_core(core, fresh=jax.tree.structure(core) != self.treedef)

    # ------------------------------------------------------------ stepping
    def update(self, model: nnx.Module, grads: nnx.State, /, **kwargs: Any) -> None:
        """Apply one step to ``model``'s trained Variables, in place.

        ``grads`` is what ``nnx.grad`` returns for them. ``kwargs`` (optax's
        ``value=``, ``grad=``) reach the transforms that take them.
        """
        if not isinstance(grads, nnx.State):
            grads = nnx.state(grads)
        extra = _paths(nnx.state(grads, nnx.Not(self.wrt)))
        if extra:
            lines = "\n".join(
                f"  {p}: {type(v).__name__} {describe(v.get_value())}"
                for p, v in extra.items()
            )
            raise ValueError(_NOT_TRAINED.format(wrt=self.wrt, paths=lines))
        state = nnx.state(model, self.wrt)
        params = nnx.to_pure_dict(state)
        grads = nnx.to_pure_dict(nnx.state(grads, self.wrt))
        params, core = self.to_shardopt().step(params, grads, **kwargs)
        nnx.replace_by_pure_dict(state, params)
        nnx.update(model, state)
        self._set_core(core)


# ------------------------------------------------------------- checkpoints
def _saved_state(model: nnx.Module, what: Any) -> nnx.State:
    return nnx.state(model, what)


def save(
    ckpt: CheckpointManager,
    step: int,
    model: nnx.Module,
    optimizer: Optimizer | None = None,
    *,
    what: Any = ALL_BUT_RNG_KEYS,
    **kwargs: Any,
) -> None:
    """Save ``model``'s Variables (all but RNG keys by default) and ``optimizer``.

    ``kwargs`` (``rng=``, ``data=``, ``metadata=``) go to
    :meth:`CheckpointManager.save`.
    """
    params = nnx.to_pure_dict(_saved_state(model, what))
    opt = optimizer.to_shardopt() if optimizer is not None else None
    ckpt.save(step, params=params, opt=opt, **kwargs)


def restore(
    ckpt: CheckpointManager,
    model: nnx.Module,
    optimizer: Optimizer | None = None,
    step: int | None = None,
    *,
    what: Any = ALL_BUT_RNG_KEYS,
    **kwargs: Any,
) -> Restored:
    """Restore a step into ``model`` and ``optimizer`` in place, in their layout.

    The live model and optimizer are the targets: every array is read straight
    into the layout it has now (another mesh or ZeRO stage than at save
    works). A checkpoint of another model raises
    :class:`shardopt.checkpoint.CheckpointMismatchError` listing the Variable
    paths that differ. Returns what :meth:`CheckpointManager.restore` read.
    """
    state = _saved_state(model, what)
    target = nnx.to_pure_dict(state)
    opt = optimizer.to_shardopt() if optimizer is not None else None
    got = ckpt.restore(step, params=target, opt=opt, **kwargs)
    nnx.replace_by_pure_dict(state, got.params)
    nnx.update(model, state)
    if optimizer is not None:
        optimizer.load_shardopt(got.opt)
    return got
