"""Parameter groups chosen by path: one optimizer, a transform per group.

Built on :class:`~shardopt.Partition`: the groups' patterns label every leaf
with its group's name, and the partition runs each group's transform on its
own leaves. Each group's state mirrors only its leaves, so under a ZeRO plan
its moments are placed (by path) like the parameters they belong to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._base import (
    AbstractTransform,
    Params,
    Updates,
    replace_hyperparameter,
    transforms_in,
)
from .._hyperparams import hyperparameter_fields
from .._interop import as_transform
from .._tree import StaticTree, trainable
from ._combinators import MaskedState
from ._partition import Partition, PartitionState, SetToZero, _keep, _mask_of
from ._paths import PathPattern, as_patterns, dotted, leaf_parts

DEFAULT = "default"


@dataclasses.dataclass(frozen=True)
class Group:
    """What :func:`group` returns: patterns, and the group's transform or changes."""

    patterns: tuple[PathPattern, ...]
    transform: Any = None
    hyperparameters: tuple[tuple[str, Any], ...] = ()
    frozen: bool = False


def group(
    *match: Any, transform: Any = None, frozen: bool = False, **hyperparameters: Any
) -> Group:
    """A parameter group for :func:`param_groups`: which leaves, and how to train them.

    ``match`` is one or more patterns over the dotted path (see
    :class:`~shardopt.PathPattern`): glob strings (``"blocks.*.attn.*"``,
    ``"**.norm.*"``), compiled regular expressions matching the whole path, or
    predicates ``(path, leaf) -> bool``. A leaf belongs to the group when any
    of them matches.

    The group is trained by ``transform`` (any shardopt or optax transform), or
    by the default transform of :func:`param_groups` when ``transform`` is not
    given; ``hyperparameters`` (``learning_rate=1e-4``, ``weight_decay=0.0``)
    replace, by name, the hyperparameters of that transform for this group
    only. ``frozen=True`` holds the group's parameters fixed (zero updates, no
    state).
    """
    if not match:
        raise ValueError("group() needs at least one path pattern")
    if frozen and (transform is not None or hyperparameters):
        raise ValueError(
            "a frozen group takes no transform or hyperparameters: its updates are "
            f"zero; got transform={transform!r:.40} and {sorted(hyperparameters)}"
        )
    return Group(
        as_patterns(match),
        transform,
        tuple(sorted(hyperparameters.items())),
        bool(frozen),
    )


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Where one leaf went: its dotted path, group, and the pattern that chose it."""

    path: str
    group: str
    pattern: PathPattern | None  # None: unmatched, so in the default group
    leaf: Any


class GroupsState(eqx.Module):
    """The state of :class:`ParamGroups`: each group's masked inner state."""

    inner_states: dict[str, MaskedState]


class ParamGroups(AbstractTransform):
    """Run each group's transform on the leaves its path patterns select.

    Leaves no pattern selects form the group ``"default"``. A leaf selected by
    two groups, and a pattern that selects no leaf, are errors naming the path
    and the patterns. The labels are computed from the tree's paths and shapes
    when tracing, so they cost nothing per step.
    """

    names: tuple[str, ...] = eqx.field(static=True)
    patterns: tuple[tuple[PathPattern, ...], ...] = eqx.field(static=True)
    descriptions: tuple[str, ...] = eqx.field(static=True)
    transforms: tuple[AbstractTransform, ...]
    takes_extra_args = True

    def assign(self, params: Params) -> list[Assignment]:
        """Each leaf's group, in tree order (``None`` leaves are skipped)."""
        out, used = [], set()
        for parts, leaf in leaf_parts(params):
            found = None
            for name, patterns in zip(self.names, self.patterns, strict=True):
                for pattern in patterns:
                    if not pattern.matches(parts, leaf):
                        continue
                    used.add(pattern)
                    if found is not None and found[0] != name:
                        raise ValueError(
                            f"the parameter {dotted(parts)} is matched by group "
                            f"{found[0]!r} (pattern {found[1]}) and by group "
                            f"{name!r} (pattern {pattern}); a parameter belongs to "
                            "one group only: make the patterns exclusive"
                        )
                    found = found or (name, pattern)
            name, pattern = found or (DEFAULT, None)
            out.append(Assignment(dotted(parts), name, pattern, leaf))
        paths = [a.path for a in out]
        for name, patterns in zip(self.names, self.patterns, strict=True):
            for pattern in patterns:
                if pattern not in used:
                    shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
                    raise ValueError(
                        f"group {name!r}: the pattern {pattern} matches no "
                        f"parameter; the parameters are: {shown or 'none'}"
                    )
        return out

    def _partition(self, tree: Params) -> tuple[Partition, Any]:
        assigned = self.assign(tree)
        labels = jax.tree.unflatten(
            jax.tree.structure(tree), [a.group for a in assigned]
        )
        in_use = {a.group for a in assigned}
        pairs = [
            (n, t)
            for n, t in zip(self.names, self.transforms, strict=True)
            if n in in_use
        ]
        names, transforms = zip(*pairs, strict=True) if pairs else ((), ())
        return Partition(names, transforms, StaticTree(labels)), labels

    def init(self, params: Params) -> GroupsState:
        partition, _ = self._partition(params)
        if not partition.labels:
            return GroupsState({})
        return GroupsState(partition.init(params).inner_states)

    def update(
        self,
        grads: Updates,
        state: GroupsState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, GroupsState]:
        partition, _ = self._partition(grads)
        if not partition.labels:
            return grads, state
        updates, inner = partition.update(
            grads, PartitionState(state.inner_states), params, **extra_args
        )
        return updates, GroupsState(inner.inner_states)

    def reset(self, state: GroupsState, name: str, params: Params) -> GroupsState:
        """``state`` with group ``name``'s state made afresh (zero moments and
        count), every other group's state kept as it is (optax#1371)."""
        if name not in self.names:
            raise ValueError(
                f"no parameter group named {name!r}; the groups are "
                f"{', '.join(map(repr, self.names))}"
            )
        if name not in state.inner_states:
            raise ValueError(
                f"the parameter group {name!r} has no parameters, so no state to reset"
            )
        _, labels = self._partition(params)
        transform = self.transforms[self.names.index(name)]
        fresh = MaskedState(transform.init(_keep(_mask_of(labels, name), params)))
        return GroupsState({**state.inner_states, name: fresh})

    def table(self, params: Params) -> str:
        """A plain-text table: each parameter's group and the pattern that chose
        it, then each group's leaf and element counts and its transform."""
        assigned = self.assign(params)
        head = f"{'group':<12}{'path':<40}{'shape':<14}{'dtype':<10}matched by"
        lines = [head, "-" * len(head)]
        for a in assigned:
            shape = "x".join(map(str, a.leaf.shape)) or "()"
            by = "(unmatched: default)" if a.pattern is None else str(a.pattern)
            dtype = np.dtype(a.leaf.dtype).name
            lines.append(f"{a.group:<12}{a.path[:39]:<40}{shape:<14}{dtype:<10}{by}")
        lines.append("-" * len(head))
        for name, description in zip(self.names, self.descriptions, strict=True):
            leaves = [a for a in assigned if a.group == name]
            if not leaves and name == DEFAULT:
                continue
            size = sum(int(np.prod(a.leaf.shape)) for a in leaves)
            lines.append(
                f"{name:<12}{len(leaves)} leaves, {size:,} elements: {description}"
            )
        return "\n".join(lines)


def _own_arrays(transform: AbstractTransform) -> AbstractTransform:
    """``transform`` with its array leaves copied: a group made from the default
    (or given the same transform object as another group) must not share a
    buffer with it, or donating the optimizer would donate that buffer twice."""
    return jax.tree.map(
        lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, transform
    )


def _hyperparameter_names(transform: AbstractTransform) -> list[str]:
    return sorted(
        {n for t in transforms_in(transform) for n in hyperparameter_fields(t)}
    )


def _describe(transform: AbstractTransform) -> str:
    return type(transform).__name__


def _group_transform(name: str, spec: Group, default: AbstractTransform):
    if spec.frozen:
        return SetToZero(), "frozen (zero updates, no state)"
    if spec.transform is None:
        transform, description = default, f"the default ({_describe(default)})"
    else:
        transform = as_transform(spec.transform, f"the transform of group {name!r}")
        description = _describe(transform)
    for hyper, value in spec.hyperparameters:
        transform, replaced = replace_hyperparameter(transform, hyper, value)
        if not replaced:
            raise ValueError(
                f"group {name!r}: the transform has no hyperparameter {hyper!r}; "
                f"it has: {', '.join(_hyperparameter_names(transform)) or 'none'}"
            )
    if spec.hyperparameters:
        changes = ", ".join(f"{k}={v!r}" for k, v in spec.hyperparameters)
        description += f" with {changes}"
    return transform, description


def param_groups(default: Any, /, **groups: Group) -> ParamGroups:
    """One optimizer with a transform per group of parameters chosen by path.

    ``default`` trains every leaf that no group's pattern selects; each keyword
    is a group name and a :func:`group` (patterns, and a transform or
    hyperparameter changes, or ``frozen=True``). For each group ``k`` with
    leaves ``S_k``: ``u_i = T_k(g restricted to S_k)_i`` for ``i`` in ``S_k``,
    as :func:`~shardopt.partition` with labels computed from the paths.

    Example (AdamW everywhere; no weight decay on norms and biases; a smaller
    learning rate for the head; the embedding frozen)::

        tx = shardopt.param_groups(
            shardopt.adamw(1e-3, weight_decay=0.1),
            no_decay=shardopt.group("**.norm.*", "**.bias", weight_decay=0.0),
            head=shardopt.group("head.weight", learning_rate=1e-4),
            embed=shardopt.group("embed.**", frozen=True),
        )
    """
    default = as_transform(default, "the default transform of param_groups")
    if DEFAULT in groups:
        raise ValueError(
            f"{DEFAULT!r} is the name of the group of unmatched parameters; name "
            "the group otherwise, or pass its transform as the first argument"
        )
    names, patterns, descriptions, transforms = [], [], [], []
    for name, spec in groups.items():
        if not isinstance(spec, Group):
            raise TypeError(
                f"group {name!r} must be given as shardopt.group(pattern, ...), got "
                f"{type(spec).__name__}: {spec!r:.60}"
            )
        transform, description = _group_transform(name, spec, default)
        names.append(name)
        patterns.append(spec.patterns)
        descriptions.append(description)
        transforms.append(_own_arrays(transform))
    names.append(DEFAULT)
    patterns.append(())
    descriptions.append(f"the default ({_describe(default)})")
    transforms.append(default)
    return ParamGroups(
        tuple(names), tuple(patterns), tuple(descriptions), tuple(transforms)
    )


def find_groups(transform: Any) -> ParamGroups:
    """The one :class:`ParamGroups` inside ``transform`` (or an Optimizer's)."""
    transform = getattr(transform, "transform", transform)
    found = [t for t in transforms_in(transform) if isinstance(t, ParamGroups)]
    if len(found) != 1:
        raise ValueError(
            f"expected one param_groups(...) transform inside, found {len(found)}"
        )
    return found[0]


def group_table(opt_or_transform: Any, params: Params) -> str:
    """Which parameter fell into which group, as a plain-text table.

    ``opt_or_transform`` is an :class:`~shardopt.Optimizer` or a transform
    containing one :func:`param_groups`; ``params`` the parameters (arrays or
    ``ShapeDtypeStruct`` s; for an Equinox model, its trainable leaves are
    read).
    """
    return find_groups(opt_or_transform).table(trainable(params))
