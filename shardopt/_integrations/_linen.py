"""Flax linen: ``shardopt.linen.TrainState``, in place of flax's ``TrainState``.

``TrainState.create(apply_fn=, params=, tx=, plan=)`` reads the boxed
parameters' annotations (``nn.Partitioned`` from ``nn.with_partitioning``,
``nn.LogicallyPartitioned`` from ``nn.with_logical_partitioning`` with logical
axis rules), moves the parameters into the plan's layout and holds a
:class:`shardopt.Optimizer` for them; ``apply_gradients(grads=)`` runs its step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import struct
from flax.core import meta
from flax.linen import spmd
from jax.sharding import PartitionSpec
from jaxtyping import Array, PyTree

from .._optimizer import Optimizer
from .._tree import path_str
from ..checkpoint._manager import CheckpointManager, Restored
from ..sharding._plan import ShardingPlan
from ._common import check_annotations, place, spec_tree, warn_if_unannotated

Rules = Sequence[tuple[str, Any]]

_IS_BOX = lambda x: isinstance(x, meta.AxisMetadata)

_AXIS_HINT = (
    "Map logical names to mesh axes with rules=[(logical, mesh_axis), ...] (or "
    "`with nn.logical_axis_rules(rules):`), or build the plan on a mesh with "
    "that axis."
)
_NO_RULES = (
    "the parameter at {path} is nn.LogicallyPartitioned with names {names}, but "
    "no logical axis rules are given: pass rules=[(logical, mesh_axis), ...] to "
    "TrainState.create, set them with `with nn.logical_axis_rules(rules):`, or "
    "give the box its rules"
)


def unbox(tree: PyTree) -> PyTree:
    """``tree`` with every ``nn.Partitioned`` box replaced by its value (no
    sharding constraint is applied)."""

    def one(x):
        if isinstance(x, meta.Partitioned):
            return x.unbox(apply_constraint=False)
        return x.unbox() if _IS_BOX(x) else x

    return jax.tree.map(one, tree, is_leaf=_IS_BOX)


def param_specs(
    params: PyTree, plan: ShardingPlan, rules: Rules | None = None
) -> dict[str, PartitionSpec]:
    """``{path: PartitionSpec}`` for each boxed parameter, on the plan's mesh.

    ``nn.Partitioned`` names are mesh axes; ``nn.LogicallyPartitioned`` names
    go through ``rules`` (else the box's own rules, else the context's
    ``nn.logical_axis_rules``). Raises for an axis the mesh lacks, naming the
    parameter.
    """
    specs, leaves, annotations = {}, {}, {}
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_IS_BOX)[0]
    for path, box in flat:
        if not _IS_BOX(box):
            continue
        name = path_str(path)
        names = tuple(getattr(box, "names", ()))
        if isinstance(box, spmd.LogicallyPartitioned):
            given = rules if rules is not None else box.rules
            if given is None:
                given = spmd.get_logical_axis_rules()
            if not given and any(isinstance(n, str) for n in names):
                raise ValueError(_NO_RULES.format(path=name, names=names))
            spec = spmd.logical_to_mesh_axes(names, given)
            annotations[name] = f"nn.LogicallyPartitioned(names={names!r})"
        else:
            spec = PartitionSpec(*names)
            annotations[name] = f"nn.Partitioned(names={names!r})"
        specs[name] = spec
        leaves[name] = unbox(box)
    check_annotations(specs, leaves, annotations, plan, "parameter", _AXIS_HINT)
    return specs


class TrainState(struct.PyTreeNode):
    """``flax.training.train_state.TrainState`` with a shardopt optimizer and plan.

    Fields: ``apply_fn`` (static), ``params`` (unboxed, in the plan's layout)
    and ``opt`` (the :class:`shardopt.Optimizer`); ``step``, ``opt_state`` and
    ``tx`` read from ``opt`` as flax's fields do. Subclass it to carry more
    (``batch_stats``), as with flax's.

    Example (``plan=shardopt.zero(1, mesh), rules=rules`` shard it)::

        import flax.linen as nn

        model = nn.Dense(2)
        variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
        state = shardopt.linen.TrainState.create(
            apply_fn=model.apply, params=variables["params"], tx=shardopt.adamw(1e-3)
        )
        loss_fn = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
        grads = jax.grad(loss_fn)(state.params, jnp.ones((8, 4)), jnp.zeros((8, 2)))
        state = state.apply_gradients(grads=grads)
    """

    apply_fn: Callable = struct.field(pytree_node=False)
    params: PyTree
    opt: Optimizer

    @property
    def step(self) -> Array:
        """The number of steps applied (the optimizer's count)."""
        return self.opt.count

    @property
    def opt_state(self) -> PyTree:
        """The optimizer's state (moments, counts), laid out by the plan."""
        return self.opt.state

    @property
    def tx(self) -> Any:
        """The optimizer's transform."""
        return self.opt.transform

    @property
    def plan(self) -> ShardingPlan | None:
        """The bound ZeRO plan (None without one)."""
        return self.opt.plan

    def apply_gradients(self, *, grads: PyTree, **kwargs: Any) -> TrainState:
        """One optimizer step; ``kwargs`` are other fields to ``replace``.

        ``grads`` is laid out like ``params`` (boxes are unwrapped).
        """
        params, opt = self.opt.step(self.params, unbox(grads))
        return self.replace(params=params, opt=opt, **kwargs)

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable,
        params: PyTree,
        tx: Any,
        plan: ShardingPlan | None = None,
        rules: Rules | None = None,
        **kwargs: Any,
    ) -> TrainState:
        """A state at step 0: ``params`` (boxed or not) placed by ``plan``.

        ``tx`` is any shardopt or optax transform. ``rules`` maps logical axis
        names of ``nn.LogicallyPartitioned`` parameters to mesh axes. Without
        any annotation the plan starts from replicated parameters and says so
        once (:class:`UnannotatedModelWarning`).
        """
        if plan is not None:
            if not isinstance(plan, ShardingPlan):
                raise TypeError(
                    f"plan must be a ShardingPlan (shardopt.zero(...)), got "
                    f"{type(plan).__name__}"
                )
            specs = param_specs(params, plan, rules)
            params = unbox(params)
            warn_if_unannotated(
                params,
                specs,
                plan,
                what="the params",
                how="nn.with_partitioning / nn.with_logical_partitioning",
                module="linen",
            )
            params = place(params, plan, spec_tree(params, specs))
        else:
            params = unbox(params)
        opt = Optimizer(tx, params, plan=plan)
        return cls(apply_fn=apply_fn, params=params, opt=opt, **kwargs)


def _arrays(state: TrainState) -> dict[str, PyTree]:
    """Every pytree field but ``opt``, by name: what is saved as parameters."""
    return {
        name: getattr(state, name)
        for name, field in state.__dataclass_fields__.items()
        if field.metadata.get("pytree_node", True) and name != "opt"
    }


def save(ckpt: CheckpointManager, step: int, state: TrainState, **kwargs: Any) -> None:
    """Save ``state`` (its params, subclass fields and optimizer) as ``step``.

    ``kwargs`` (``rng=``, ``data=``, ``metadata=``) go to
    :meth:`CheckpointManager.save`.
    """
    ckpt.save(step, params=_arrays(state), opt=state.opt, **kwargs)


def restore(
    ckpt: CheckpointManager,
    state: TrainState,
    step: int | None = None,
    **kwargs: Any,
) -> tuple[TrainState, Restored]:
    """``state`` with a saved step's arrays, read into ``state``'s own layout
    (any mesh or ZeRO stage); and what was read. ``kwargs`` go to
    :meth:`CheckpointManager.restore`."""
    got = ckpt.restore(step, params=_arrays(state), opt=state.opt, **kwargs)
    return state.replace(**got.params, opt=got.opt), got
