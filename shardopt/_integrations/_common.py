"""What the Flax front ends share: model annotations as PartitionSpecs, checked
against the plan's mesh, and the one warning for a model with none."""

from __future__ import annotations

import warnings
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .._tree import describe, path_str, trainable
from ..sharding._plan import ShardingPlan
from ..sharding._specs import axes_of


class UnannotatedModelWarning(UserWarning):
    """A model given to a ZeRO plan carries no sharding annotation at all.

    The plan then starts from replicated parameters (plain data parallelism,
    with the optimizer state, gradients or parameters partitioned over the data
    axes as the stage says). Silence it, when that is the intent, with
    ``warnings.filterwarnings("ignore", category=UnannotatedModelWarning)``.
    """


_UNANNOTATED = (
    "{what} carries no sharding annotation ({how}) and no parameter is laid out "
    "across devices, so the ZeRO stage {stage} plan starts from replicated "
    "parameters and partitions over the data axes {axes} only. Annotate the "
    "model for tensor parallelism, or silence this with warnings.filterwarnings("
    "'ignore', category=shardopt.{module}.UnannotatedModelWarning)."
)

_MISSING_AXIS = (
    "the {what} at {path} ({desc}) is annotated {annotation}, i.e. "
    "PartitionSpec{spec}, but the plan's mesh {mesh} has no axis {axis!r}. "
    "{hint}"
)


def check_annotations(
    specs: dict[str, PartitionSpec],
    leaves: dict[str, Any],
    annotations: dict[str, Any],
    plan: ShardingPlan,
    what: str,
    hint: str,
) -> None:
    """Raise if an annotation names a mesh axis the plan's mesh lacks."""
    for path, spec in specs.items():
        for entry in spec:
            for axis in axes_of(entry):
                if axis is not None and axis not in plan.mesh.axis_names:
                    raise ValueError(
                        _MISSING_AXIS.format(
                            what=what,
                            path=path,
                            desc=describe(leaves[path]),
                            annotation=annotations[path],
                            spec=tuple(spec),
                            mesh=dict(plan.mesh.shape),
                            axis=axis,
                            hint=hint,
                        )
                    )


def warn_if_unannotated(
    params: PyTree,
    specs: dict[str, PartitionSpec],
    plan: ShardingPlan,
    *,
    what: str,
    how: str,
    module: str,
) -> None:
    """Say (once per call site, as ``warnings`` does) that nothing is annotated."""
    if specs:
        return
    for leaf in jax.tree.leaves(trainable(params)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and not sharding.is_fully_replicated:
            return
    warnings.warn(
        _UNANNOTATED.format(
            what=what,
            how=how,
            stage=plan.stage,
            axes=plan.data_axes,
            module=module,
        ),
        UnannotatedModelWarning,
        stacklevel=3,
    )


def spec_tree(params: PyTree, specs: dict[str, PartitionSpec]) -> PyTree:
    """``specs`` (by path) as a tree like ``params``; None where not annotated."""
    return jax.tree_util.tree_map_with_path(lambda p, _: specs.get(path_str(p)), params)


def place(params: PyTree, plan: ShardingPlan, specs: PyTree) -> PyTree:
    """``params`` in the plan's parameter layout, starting from ``specs``.

    Concrete leaves are moved (``jax.device_put``), abstract ones get the
    shardings; leaves without an annotation keep the layout they have.
    """
    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    if abstract:
        return plan.abstract_params(params, specs)
    return plan.shard_params(params, specs)
