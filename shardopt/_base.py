"""The Transform protocol, the small states every transform shares, apply_updates."""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ._tree import is_trainable
from ._tree_math import add

Params = PyTree
Updates = PyTree
State = PyTree


class AbstractTransform(eqx.Module):
    """A gradient transformation: optax's ``GradientTransformation`` as a Module.

    ``init(params)`` builds the state; ``update(grads, state, params)`` returns the
    transformed updates and the new state. Updates are *added* to parameters by
    :func:`apply_updates`, so a descent step carries the minus sign itself.
    Hyperparameters are array (or schedule) fields: replacing one with
    ``eqx.tree_at`` never recompiles a jitted step.
    """

    @abc.abstractmethod
    def init(self, params: Params) -> State:
        """Return the initial state for ``params`` (arrays or ShapeDtypeStructs)."""

    @abc.abstractmethod
    def update(
        self, grads: Updates, state: State, params: Params | None = None
    ) -> tuple[Updates, State]:
        """Return ``(updates, new_state)`` for one step."""


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


class Identity(AbstractTransform):
    """Pass the updates through unchanged."""

    def init(self, params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(
        self, grads: Updates, state: EmptyState, params: Params | None = None
    ) -> tuple[Updates, EmptyState]:
        del params
        return grads, state


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

    return jax.tree.map(apply, updates, params, is_leaf=lambda x: x is None)
