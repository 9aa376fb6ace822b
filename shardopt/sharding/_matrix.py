"""The plan's answer to the matrix optimizers: where whole matrices go.

:class:`shardopt.Optimizer` builds a :class:`PlanMatrixLayout` from its plan
and the parameters, and sets it (``using_matrix_layout``) while it traces its
step; :func:`shardopt._transforms._matrix_layout.per_matrix` asks it for the
stored layout of each matrix and spreads stacks of whole matrices over every
device of the mesh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jax.sharding import PartitionSpec
from jaxtyping import Array, PyTree

from .._transforms._matrix_layout import AbstractMatrixLayout
from ._specs import pick
from ._state import _factored_spec

if TYPE_CHECKING:
    from ._plan import ShardingPlan


class PlanMatrixLayout(AbstractMatrixLayout):
    """A :class:`ShardingPlan`'s layouts, for the step of one parameter tree."""

    def __init__(self, plan: ShardingPlan, params: PyTree) -> None:
        self.plan = plan
        self.leaves = plan.layout(params)
        self.zero = plan.stage >= 1
        names = tuple(plan.mesh.axis_names)
        self.axes = names[0] if len(names) == 1 else names

    @property
    def shares(self) -> int:
        return self.plan.mesh.size

    def spec(self, name: str, shape: tuple[int, ...], kept: Any = None) -> Any:
        leaf = self.leaves.get(name)
        if leaf is None:
            return None
        if kept is None:
            return pick(leaf, self.zero) if tuple(shape) == leaf.shape else None
        return _factored_spec(self.plan, leaf, tuple(kept), tuple(shape), self.zero)[0]

    def is_partitioned(self, spec: Any) -> bool:
        return any(entry is not None for entry in spec)

    def spread(self, stack: Array) -> Array:
        spec = PartitionSpec(self.axes, *([None] * (stack.ndim - 1)))
        return self.plan.constrain(stack, self.plan.sharding(spec))

    def stacked(self, stack: Array, spec: Any) -> Array:
        spec = PartitionSpec() if spec is None else PartitionSpec(None, *spec)
        return self.plan.constrain(stack, self.plan.sharding(spec))

    def place(self, leaf: Array, spec: Any) -> Array:
        return self.plan.constrain(leaf, self.plan.sharding(spec))


def matrix_layout(plan: ShardingPlan, params: PyTree) -> PlanMatrixLayout:
    """The layout the matrix transforms see in a step of ``params`` under ``plan``."""
    return PlanMatrixLayout(plan, params)
