"""The Transform protocol, the small states every transform shares, apply_updates."""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from ._hyperparams import (
    as_hyperparameter,
    check_division_guards,
    hyperparameter_fields,
)
from ._tree import is_trainable, leaf_paths
from ._tree_math import add

Params = PyTree
Updates = PyTree
State = PyTree


class AbstractTransform(eqx.Module):
    """A gradient transformation: optax's ``GradientTransformation`` as a Module.

    ``init(params)`` builds the state; ``update(grads, state, params)`` returns the
    transformed updates and the new state. Updates are *added* to parameters by
    :func:`apply_updates`, so a descent step carries the minus sign itself.

    Hyperparameters are array (or schedule) fields, so a transform is a pytree:
    passed as an argument of ``eqx.filter_jit`` (or inside an
    :class:`~shardopt.Optimizer`), a new learning rate never recompiles.

    A transform is also hashable by value, which is what optax's idioms need:
    ``jax.jit(tx.update)`` and ``jax.jit(step, static_argnums=0)(tx, ...)``
    work, with the hyperparameters compiled in as constants (a transform with
    other values compiles again; equal values share the compilation).

    Transforms that read optax's extra arguments (``value``, ``grad``,
    ``value_fn``, ...) set ``takes_extra_args = True`` and accept them as
    keywords of ``update``; :func:`update_with_extra_args` passes them only to
    those.
    """

    takes_extra_args: ClassVar[bool] = False
    # True where each element's update and new state depend only on the same
    # element of the gradients, state and parameters (and on scalars: the
    # count, hyperparameters, schedules). No reduction over a leaf or the tree.
    elementwise: ClassVar[bool] = False

    def is_elementwise(self) -> bool:
        """True if the update is elementwise, so that the
        :class:`~shardopt.Optimizer` may run it on flat buffers (the leaves of
        one dtype concatenated) with the same numbers as leaf by leaf. The
        class's ``elementwise`` flag; combinators ask their children."""
        return type(self).elementwise

    def expects_per_example_grads(self) -> bool:
        """True if ``update`` takes one gradient per example (a leading batch
        dim on every leaf), as differentially private aggregation does; then
        ``Optimizer.step`` checks the gradients for that shape instead."""
        return False

    @abc.abstractmethod
    def init(self, params: Params) -> State:
        """Return the initial state for ``params`` (arrays or ShapeDtypeStructs)."""

    @abc.abstractmethod
    def update(
        self, grads: Updates, state: State, params: Params | None = None
    ) -> tuple[Updates, State]:
        """Return ``(updates, new_state)`` for one step."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        update = cls.__dict__.get("update")
        if update is not None and not getattr(update, "__isabstractmethod__", False):
            cls.update = _checking_state(update)

    def __check_init__(self) -> None:
        check_division_guards(self)

    def __hash__(self) -> int:
        leaves, treedef = jax.tree_util.tree_flatten(self)
        return hash((treedef, tuple(_hash_key(leaf) for leaf in leaves)))


def _checking_state(update: Callable) -> Callable:
    """``update`` that explains a failure caused by another transform's state.

    Costs nothing when the update works: only after an exception is the state
    compared with the structure ``init`` makes (abstractly, by eval_shape).
    """

    @functools.wraps(update)
    def checked(self, grads, state, *args, **kwargs):
        try:
            return update(self, grads, state, *args, **kwargs)
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as err:
            message = _foreign_state(self, grads, state)
            if message is None:
                raise
            raise TypeError(message) from err

    return checked


def _foreign_state(transform: AbstractTransform, grads: Any, state: Any) -> str | None:
    try:
        expected = jax.eval_shape(transform.init, grads)
    except Exception:  # init itself cannot run on these grads: not our case
        return None
    if jax.tree.structure(expected) == jax.tree.structure(state):
        return None
    name = skeleton(transform)
    return (
        f"{name}.update was given a state that {name}.init does not make: got "
        f"{skeleton(state)}, expected {skeleton(expected)}. The state comes from "
        "another transform (another optimizer's init?): build it with this "
        "transform's init, or restore the matching optimizer."
    )


def skeleton(tree: Any, depth: int = 0) -> str:
    """The container types of ``tree`` by name: ``Chain(ScaleByAdam, ...)``."""
    if depth > 3:
        return "..."
    if isinstance(tree, eqx.Module):
        inner = [
            skeleton(getattr(tree, f.name), depth + 1)
            for f in dataclasses.fields(tree)
            if isinstance(getattr(tree, f.name, None), (eqx.Module, tuple, list))
        ]
        name = type(tree).__name__
        if len(inner) == 1 and inner[0].startswith("("):
            return name + inner[0]
        return f"{name}({', '.join(inner)})" if inner else name
    if isinstance(tree, (tuple, list)):
        return "(" + ", ".join(skeleton(x, depth + 1) for x in tree) + ")"
    return type(tree).__name__


def _hash_key(leaf: Any) -> Any:
    """A hashable stand-in for a leaf, equal for equal values.

    Concrete arrays hash by shape, dtype and bytes (read once: JAX caches the
    host copy); tracers and arrays spread over other processes by identity.
    """
    if isinstance(leaf, jax.core.Tracer):
        return ("id", id(leaf))
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable:
            return ("id", id(leaf))
        leaf = np.asarray(leaf)
    if isinstance(leaf, np.ndarray | np.generic):
        return (leaf.shape, leaf.dtype.str, leaf.tobytes())
    return leaf


def update_with_extra_args(
    transform: AbstractTransform,
    grads: Updates,
    state: State,
    params: Params | None,
    extra_args: dict[str, Any],
) -> tuple[Updates, State]:
    """``transform.update``, given the extra arguments only if it takes them."""
    if transform.takes_extra_args:
        return transform.update(grads, state, params, **extra_args)
    return transform.update(grads, state, params)


class EmptyState(eqx.Module):
    """The state of a transform that keeps nothing between steps."""


class CountState(eqx.Module):
    """The state of a transform whose only memory is its step count.

    The count is what schedules are evaluated at, so any transform with a
    hyperparameter keeps one; its structure then never depends on whether a
    hyperparameter is a float or a schedule.
    """

    count: Array


def zero_count() -> Array:
    """The initial step count: int32 zero, as in optax."""
    return jnp.zeros([], jnp.int32)


def safe_increment(count: Array) -> Array:
    """``count + 1`` that saturates at the dtype's maximum instead of wrapping."""
    top = jnp.array(jnp.iinfo(count.dtype).max, count.dtype)
    return jnp.where(count < top, count + jnp.array(1, count.dtype), top)


class AbstractCountingTransform(AbstractTransform):
    """A transform whose only memory is the step count its schedules are read at.

    Subclasses implement :meth:`apply`; ``init`` and ``update`` keep the count.
    """

    @abc.abstractmethod
    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        """The updates for this step, with hyperparameters resolved at ``count``."""

    def init(self, params: Params) -> CountState:
        del params
        return CountState(zero_count())

    def update(
        self, grads: Updates, state: CountState, params: Params | None = None
    ) -> tuple[Updates, CountState]:
        updates = self.apply(grads, params, state.count)
        return updates, CountState(safe_increment(state.count))


class AbstractStatelessTransform(AbstractTransform):
    """A transform that keeps nothing between steps (its state is EmptyState).

    Subclasses implement :meth:`apply`; ``init`` and ``update`` are given.
    """

    @abc.abstractmethod
    def apply(self, grads: Updates, params: Params | None) -> Updates:
        """The updates for this step."""

    def init(self, params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(
        self, grads: Updates, state: EmptyState, params: Params | None = None
    ) -> tuple[Updates, EmptyState]:
        return self.apply(grads, params), state


class Identity(AbstractStatelessTransform):
    """Pass the updates through unchanged."""

    elementwise = True

    def apply(self, grads: Updates, params: Params | None) -> Updates:
        del params
        return grads


def identity() -> Identity:
    """A transform that leaves the updates as they are."""
    return Identity()


def apply_updates(params: Params, updates: Updates) -> Params:
    """Add ``updates`` to ``params``, keeping each parameter's dtype.

    Leaves of ``params`` that are not trainable arrays (activation functions,
    integer buffers, ...) and leaves whose update is ``None`` pass through.
    The sum is taken in the promoted dtype and rounded once to the parameter's.
    """

    def apply(update, param):
        if update is None or not is_trainable(param):
            return param
        return add(param, update).astype(param.dtype)

    try:
        return jax.tree.map(apply, updates, params, is_leaf=lambda x: x is None)
    except ValueError as err:
        got = set(leaf_paths(updates))
        want = set(leaf_paths(params))
        raise ValueError(
            "apply_updates: the updates are not laid out like the parameters; "
            f"missing from the updates: {', '.join(sorted(want - got)) or 'none'}; "
            f"not among the parameters: {', '.join(sorted(got - want)) or 'none'}"
        ) from err


def transforms_in(node: Any) -> list[AbstractTransform]:
    """Every transform Module inside ``node`` (through tuples and fields)."""
    if isinstance(node, (tuple, list)):
        return [t for child in node for t in transforms_in(child)]
    if not isinstance(node, AbstractTransform):
        return []
    found = [node]
    for field in dataclasses.fields(node):
        found += transforms_in(getattr(node, field.name))
    return found


def replace_hyperparameter(node: Any, name: str, value: Any) -> tuple[Any, int]:
    """``node`` with every transform's hyperparameter ``name`` set; and how many."""
    if isinstance(node, (tuple, list)):
        pairs = [replace_hyperparameter(child, name, value) for child in node]
        return type(node)(p[0] for p in pairs), sum(p[1] for p in pairs)
    if not isinstance(node, AbstractTransform):
        return node, 0
    replaced = 0
    fields = hyperparameter_fields(node)
    for field in dataclasses.fields(node):
        if field.name == name and name in fields:
            new = as_hyperparameter(value, name=name, **fields[name])
            replaced += 1
        else:
            new, count = replace_hyperparameter(getattr(node, field.name), name, value)
            if not count:
                continue
            replaced += count
        node = eqx.tree_at(
            lambda m, f=field.name: getattr(m, f),
            node,
            new,
            is_leaf=lambda x: x is None,
        )
    return node, replaced
