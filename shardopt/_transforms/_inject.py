"""optax's inject_hyperparams: a transform whose hyperparameters live in its state."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array

from .._base import (
    AbstractTransform,
    Params,
    State,
    Updates,
    safe_increment,
    update_with_extra_args,
    zero_count,
)
from .._hyperparams import AbstractSchedule, Schedule, resolve
from .._interop import as_transform
from .._tree_math import canonical_dtype
from ._dtypes import tree_dtype


class InjectHyperparamsState(eqx.Module):
    """The step count, the hyperparameters of this step, and the inner state.

    ``hyperparams`` maps each numeric argument of the inner factory to a scalar
    array: after a step, the values that step used. Replacing an entry
    (``state.hyperparams["learning_rate"] = x``, or ``eqx.tree_at``) sets it for
    the next update on; an array of the same dtype does so without recompiling.
    Scheduled entries are overwritten by their schedule at every step.
    """

    count: Array
    hyperparams: dict[str, Array]
    inner_state: State


class _Static:
    """An argument held as structure: hashable by value where it can be."""

    __slots__ = ("_key", "value")

    def __init__(self, value: Any):
        self.value = value
        try:
            hash(value)
            self._key = ("value", value)
        except TypeError:
            leaves, treedef = jax.tree.flatten(value)
            try:
                hash(tuple(leaves))
                self._key = ("tree", treedef, tuple(leaves))
            except TypeError:
                self._key = ("id", id(value))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and self._key == other._key

    def __repr__(self) -> str:
        return repr(self.value)


def _floats_in(value: Any, dtype: jnp.dtype) -> Array:
    """``value`` as an array, in ``dtype`` if it is a float."""
    current = value.dtype if hasattr(value, "dtype") else type(value)
    if jnp.issubdtype(current, jnp.floating):
        return jnp.asarray(value, dtype)
    return jnp.asarray(value)


def _in_dtype(value: Any, dtype: jnp.dtype) -> Array:
    """As :func:`_floats_in`, but a strongly typed JAX array keeps its dtype (optax)."""
    if isinstance(value, jax.Array) and not value.weak_type:
        return value
    return _floats_in(value, dtype)


class InjectHyperparams(AbstractTransform):
    """``inner_factory(**arguments)``, rebuilt every step from the state's numbers.

    The numeric arguments start in :attr:`InjectHyperparamsState.hyperparams`
    (floats in ``hyperparam_dtype``, by default the parameters' highest
    dtype); the scheduled ones are written there each step, read at the step
    count. Other arguments (bools, strings, dtypes, ``None``, those named in
    ``static_args``) are fixed.
    """

    inner_factory: Callable[..., Any] = eqx.field(static=True)
    hyperparams: dict[str, Array]
    schedules: dict[str, Schedule]
    static_kwargs: tuple[tuple[str, _Static], ...] = eqx.field(static=True)
    strong: frozenset[str] = eqx.field(static=True)
    hyperparam_dtype: jnp.dtype | None = eqx.field(static=True)
    takes_extra_args = True

    def inner(self, hyperparams: dict[str, Any]) -> AbstractTransform:
        """The inner transform with these hyperparameter values."""
        kwargs = {name: held.value for name, held in self.static_kwargs}
        made = self.inner_factory(**kwargs, **hyperparams)
        return as_transform(made, "the transform made by inject_hyperparams' factory")

    def _dtype(self, params: Params | None) -> jnp.dtype:
        if self.hyperparam_dtype is not None:
            return self.hyperparam_dtype
        return tree_dtype(params, "highest")

    def _scheduled(self, count: Array, dtype: jnp.dtype) -> dict[str, Any]:
        return {
            name: _in_dtype(resolve(schedule, count, name=name), dtype)
            for name, schedule in self.schedules.items()
        }

    def init(self, params: Params) -> InjectHyperparamsState:
        dtype = self._dtype(params)
        count = zero_count()
        hyperparams = {
            name: value if name in self.strong else _floats_in(value, dtype)
            for name, value in self.hyperparams.items()
        }
        hyperparams.update(self._scheduled(count, dtype))
        inner_state = _inner_init(self, hyperparams, params)
        return InjectHyperparamsState(count, hyperparams, inner_state)

    def update(
        self,
        grads: Updates,
        state: InjectHyperparamsState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, InjectHyperparamsState]:
        dtype = self._dtype(params)
        hyperparams = {
            name: _in_dtype(value, dtype) for name, value in state.hyperparams.items()
        }
        hyperparams.update(self._scheduled(state.count, dtype))
        updates, inner_state = _inner_update(
            self, hyperparams, grads, state.inner_state, params, extra_args
        )
        new_state = InjectHyperparamsState(
            safe_increment(state.count), hyperparams, inner_state
        )
        return updates, new_state


# The inner transform is built from the hyperparameters inside a trace, eager
# calls included: traced values keep their dtype (a bfloat16 learning rate
# stays bfloat16), where the constructors' checks would turn concrete ones into
# float32 scalars. Nested in a caller's jit, these are inlined.
@eqx.filter_jit
def _inner_init(
    transform: InjectHyperparams, hyperparams: dict[str, Array], params: Params
) -> State:
    return transform.inner(hyperparams).init(params)


@eqx.filter_jit
def _inner_update(
    transform: InjectHyperparams,
    hyperparams: dict[str, Array],
    grads: Updates,
    inner_state: State,
    params: Params | None,
    extra_args: dict[str, Any],
) -> tuple[Updates, State]:
    inner = transform.inner(hyperparams)
    return update_with_extra_args(inner, grads, inner_state, params, extra_args)


def _is_schedule(value: Any) -> bool:
    # dtypes (jnp.float32, np.int8, ...) are classes, hence callable: not schedules
    if isinstance(value, AbstractSchedule):
        return True
    return callable(value) and not isinstance(value, type)


def _is_stateful_schedule(value: Any) -> bool:
    # optax.StatefulSchedule, by shape: optax is not imported.
    return all(callable(getattr(value, name, None)) for name in ("init", "update"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number, np.ndarray, jax.Array))


def inject_hyperparams(
    inner_factory: Callable[..., Any],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: DTypeLike | None = None,
) -> Callable[..., InjectHyperparams]:
    """Make ``inner_factory``'s numeric arguments state, and let any be a schedule.

    ``inject_hyperparams(shardopt.adam)(learning_rate=1e-3)`` is Adam whose state
    (:class:`InjectHyperparamsState`) holds ``count``, ``hyperparams`` (here
    ``learning_rate``, ``b1``, ``b2``, ``eps``, ``eps_root``) and ``inner_state``.
    Each step rebuilds ``inner_factory(**hyperparams)`` from the state, with every
    scheduled argument evaluated at ``count``. As in optax, every callable
    argument is taken for a schedule unless ``static_args`` names it (a mask
    function, say); bools and the other non-numeric arguments stay fixed.
    ``inner_factory`` may build a shardopt transform or an optax one.
    """
    if not callable(inner_factory):
        raise TypeError(
            f"inner_factory must be a function that builds a transform, got "
            f"{type(inner_factory).__name__}"
        )
    static = {static_args} if isinstance(static_args, str) else set(static_args)
    signature = inspect.signature(inner_factory)
    if not static.issubset(signature.parameters):
        raise ValueError(
            f"static_args must name arguments of inner_factory: got "
            f"{sorted(static)}, inner_factory takes {list(signature.parameters)}"
        )
    dtype = canonical_dtype(hyperparam_dtype, "hyperparam_dtype")

    @functools.wraps(inner_factory)
    def wrapped(*args: Any, **kwargs: Any) -> InjectHyperparams:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        numbers, schedules, fixed, strong = {}, {}, {}, set()
        for name, value in bound.arguments.items():
            if name in static or isinstance(value, bool):
                fixed[name] = value
            elif _is_schedule(value):
                if _is_stateful_schedule(value):
                    raise TypeError(
                        f"{name}: stateful schedules (optax.StatefulSchedule) are "
                        "not supported; pass a schedule of the step count"
                    )
                schedules[name] = value
            elif _is_number(value):
                if isinstance(value, jax.Array) and not value.weak_type:
                    strong.add(name)
                    numbers[name] = value
                else:
                    numbers[name] = jnp.asarray(value)
            else:
                fixed[name] = value
        transform = InjectHyperparams(
            inner_factory,
            numbers,
            schedules,
            tuple((name, _Static(value)) for name, value in fixed.items()),
            frozenset(strong),
            dtype,
        )
        # Build the inner transform once with the values as given, so that bad
        # arguments fail here, each named by the factory's own checks.
        transform.inner({n: v for n, v in bound.arguments.items() if n not in fixed})
        return transform

    return wrapped
