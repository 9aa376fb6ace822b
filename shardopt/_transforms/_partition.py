"""Different transforms for different parameters; freezing; named chains."""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._base import (
    AbstractStatelessTransform,
    AbstractTransform,
    Params,
    State,
    Updates,
    update_with_extra_args,
)
from .._interop import as_transform
from .._tree import StaticTree
from ._combinators import Masked, MaskedState, masked

Labels = Any  # a tree of hashable labels shaped like (a prefix of) the parameters


class SetToZero(AbstractStatelessTransform):
    """Replace every update by zeros, so that the parameters do not move."""

    def apply(self, grads: Updates, params: Params | None) -> Updates:
        del params
        return jax.tree.map(jnp.zeros_like, grads)


def set_to_zero() -> SetToZero:
    """Map every update to zero: ``u -> 0``, so ``params + u`` leaves them fixed.

    Combine with :func:`partition` or :func:`~shardopt.masked` to freeze part of
    the parameters.
    """
    return SetToZero()


class PartitionState(eqx.Module):
    """The state of :class:`Partition`: each label's masked inner state."""

    inner_states: dict[Hashable, MaskedState]


class Partition(AbstractTransform):
    """Run ``transforms[i]`` on the leaves labelled ``labels[i]``, each alone.

    ``param_labels`` is a tree of labels shaped like the parameters (or a prefix
    of them), or a function of the parameters returning one. Each transform
    sees only its own leaves (``None`` elsewhere, so its state costs nothing
    there, and under a ZeRO plan its moments are partitioned like the
    parameters they belong to).
    """

    labels: tuple[Hashable, ...] = eqx.field(static=True)
    transforms: tuple[AbstractTransform, ...]
    param_labels: Callable[[Params], Labels] | StaticTree = eqx.field(static=True)
    mask_compatible_extra_args: bool = eqx.field(static=True, default=False)
    # a label no parameter has is allowed (optax's partition allows it): for
    # constructors with a fallback group that may be empty (muon's adam)
    allow_unused: bool = eqx.field(static=True, default=False)
    takes_extra_args = True

    def _labels_for(self, tree: Params) -> Labels:
        if isinstance(self.param_labels, StaticTree):
            labels = self.param_labels.tree
        else:
            labels = self.param_labels(tree)
        try:
            jax.tree.map(lambda label, _: label, labels, tree)
        except (ValueError, TypeError) as err:
            raise ValueError(
                "param_labels must be a tree of labels shaped like the parameters "
                f"(or a prefix of them): {err}"
            ) from err
        _check_labels(set(jax.tree.leaves(labels)), self.labels, self.allow_unused)
        return labels

    def init(self, params: Params) -> PartitionState:
        labels = self._labels_for(params)
        inner = {}
        for label, transform in zip(self.labels, self.transforms, strict=True):
            mask = _mask_of(labels, label)
            inner[label] = MaskedState(transform.init(_keep(mask, params)))
        return PartitionState(inner)

    def update(
        self,
        grads: Updates,
        state: PartitionState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, PartitionState]:
        if set(state.inner_states) != set(self.labels):
            raise ValueError(
                f"partition of labels {list(self.labels)} got a state for "
                f"{list(state.inner_states)}; was the state made by another "
                "optimizer?"
            )
        labels = self._labels_for(grads)
        structure = jax.tree.structure(grads)
        updates = grads
        inner = {}
        for label, transform in zip(self.labels, self.transforms, strict=True):
            mask = _mask_of(labels, label)
            kept_params = None if params is None else _keep(mask, params)
            kept_extra = {
                name: (
                    _keep(mask, value)
                    if self.mask_compatible_extra_args
                    and jax.tree.structure(value) == structure
                    else value
                )
                for name, value in extra_args.items()
            }
            new, inner_state = update_with_extra_args(
                transform,
                _keep(mask, grads),
                state.inner_states[label].inner_state,
                kept_params,
                kept_extra,
            )
            updates = jax.tree.map(lambda m, n, u: n if m else u, mask, new, updates)
            inner[label] = MaskedState(inner_state)
        return updates, PartitionState(inner)


def _check_labels(used: set, given: tuple, allow_unused: bool = False) -> None:
    no_transform = used - set(given)
    if no_transform:
        raise ValueError(
            f"param_labels uses labels with no transform: {_sorted(no_transform)}; "
            f"transforms are given for {_sorted(given)}"
        )
    no_label = set(given) - used
    if no_label and not allow_unused:
        raise ValueError(
            f"transforms are given for labels that no parameter has: "
            f"{_sorted(no_label)}; param_labels uses {_sorted(used)}"
        )


def _sorted(labels) -> list:
    return sorted(labels, key=repr)


def _mask_of(labels: Labels, label: Hashable) -> Any:
    return jax.tree.map(lambda x: x == label, labels)


def _keep(mask: Any, tree: Params) -> Params:
    return jax.tree.map(lambda m, x: x if m else None, mask, tree)


def partition(
    transforms: Mapping[Hashable, Any],
    param_labels: Labels | Callable[[Params], Labels],
    *,
    mask_compatible_extra_args: bool = False,
) -> Partition:
    """Apply a different transform to each labelled subset of the parameters.

    ``transforms`` maps each label to a transform (shardopt or optax);
    ``param_labels`` gives every leaf (or subtree) a label, as a tree shaped
    like the parameters (or a prefix of them) or a function of the parameters.
    Leaf ``i`` is updated by ``transforms[label_i]`` alone: for every label
    ``l``, ``u_l = T_l(g restricted to the leaves labelled l)``. With
    ``mask_compatible_extra_args``, extra arguments shaped like the updates
    are restricted the same way.

    Every label must have a transform and every transform a label: either
    mismatch raises a ``ValueError`` naming the labels.
    """
    if not isinstance(transforms, Mapping):
        raise TypeError(
            "transforms must be a mapping from labels to transforms, got "
            f"{type(transforms).__name__}"
        )
    if not transforms:
        raise ValueError("transforms must give at least one label a transform")
    labels = tuple(transforms)
    inner = tuple(
        as_transform(t, f"the transform for label {label!r}")
        for label, t in transforms.items()
    )
    if callable(param_labels):
        static = param_labels
    else:
        static = StaticTree(param_labels, what="param_labels")
        _check_labels(set(static.leaves), labels)
    return Partition(labels, inner, static, bool(mask_compatible_extra_args))


multi_transform = partition


def freeze(mask: bool | Any) -> Masked:
    """Zero the updates where ``mask`` is True, holding those parameters fixed.

    ``mask`` is a bool (everything or nothing) or a tree of bools shaped like
    the parameters: ``u_i -> 0`` where ``mask_i``, ``u_i`` unchanged elsewhere.
    """
    return masked(SetToZero(), mask)


def selective_transform(optimizer: Any, *, freeze_mask: bool | Any) -> Partition:
    """Run ``optimizer`` on the leaves where ``freeze_mask`` is False only.

    Leaves where ``freeze_mask`` is True get zero updates and no optimizer
    state: ``partition({"train": optimizer, "freeze": set_to_zero()}, labels)``
    with ``labels_i = "freeze" if freeze_mask_i else "train"``.
    """
    try:
        labels = jax.tree.map(lambda m: "freeze" if bool(m) else "train", freeze_mask)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise TypeError(
            "freeze_mask must be a bool or a tree of Python bools shaped like the "
            f"parameters: {err}"
        ) from err
    # only the labels in use: an all-False (or all-True) mask needs one of them.
    used = set(jax.tree.leaves(labels))
    transforms = {"train": optimizer, "freeze": SetToZero()}
    return partition({k: v for k, v in transforms.items() if k in used}, labels)


class NamedChain(AbstractTransform):
    """Apply ``transforms`` in order; the state maps each one's name to its state.

    Extra arguments (``value``, ``grad``, ...) reach every transform that takes
    them.
    """

    names: tuple[str, ...] = eqx.field(static=True)
    transforms: tuple[AbstractTransform, ...]
    takes_extra_args = True

    def init(self, params: Params) -> collections.OrderedDict[str, State]:
        return collections.OrderedDict(
            (name, t.init(params))
            for name, t in zip(self.names, self.transforms, strict=True)
        )

    def update(
        self,
        grads: Updates,
        state: Mapping[str, State],
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, collections.OrderedDict[str, State]]:
        if set(state) != set(self.names):
            raise ValueError(
                f"named_chain of {list(self.names)} got a state for "
                f"{list(state)}; was the state made by another optimizer?"
            )
        new_state = collections.OrderedDict()
        for name, transform in zip(self.names, self.transforms, strict=True):
            grads, new_state[name] = update_with_extra_args(
                transform, grads, state[name], params, extra_args
            )
        return grads, new_state


def named_chain(*transforms: tuple[str, Any]) -> NamedChain:
    """Compose transforms like :func:`~shardopt.chain`, each under a name.

    Each argument is a ``(name, transform)`` pair; the state is an ordered
    mapping ``name -> that transform's state``, so ``state["adam"]`` finds it.
    Names must be distinct strings.
    """
    names, inner = [], []
    for i, pair in enumerate(transforms):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(
                f"named_chain argument {i} must be a (name, transform) pair, got "
                f"{type(pair).__name__}: {pair!r:.60}"
            )
        name, transform = pair
        if not isinstance(name, str):
            raise TypeError(
                f"named_chain argument {i}: the name must be a str, got "
                f"{type(name).__name__}: {name!r:.60}"
            )
        names.append(name)
        inner.append(as_transform(transform, f"named_chain transform {name!r}"))
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"named_chain names must be distinct; repeated: {repeated}")
    return NamedChain(tuple(names), tuple(inner))
