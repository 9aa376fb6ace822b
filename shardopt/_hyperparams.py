"""Hyperparameters as array leaves or schedules, validated once at construction."""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from ._base import AbstractTransform


class AbstractSchedule(eqx.Module):
    """A function of the step count whose own numbers are array leaves.

    Calling it with an int32 count returns a float32 scalar. Because the numbers
    are leaves, ``eqx.tree_at`` can change e.g. a peak learning rate without
    recompiling a jitted step.
    """

    @abc.abstractmethod
    def __call__(self, count: ArrayLike) -> Array:
        """The value at step ``count``."""


Schedule = AbstractSchedule | Callable[[Array], ArrayLike]
Hyperparameter = Array | Schedule
ScalarOrSchedule = float | ArrayLike | Schedule


def _is_schedule(value: Any) -> bool:
    return isinstance(value, AbstractSchedule) or (
        callable(value) and not isinstance(value, (jax.Array, np.ndarray))
    )


@dataclasses.dataclass(frozen=True)
class Domain:
    """The values a hyperparameter may take: an interval of the real line."""

    low: float = -np.inf
    high: float = np.inf
    low_open: bool = False
    high_open: bool = False
    text: str = "a real number"

    def contains(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return bool(above and below)


REAL = Domain()
NONNEGATIVE = Domain(low=0.0, text=">= 0")
POSITIVE = Domain(low=0.0, low_open=True, text="> 0")
UNIT_INTERVAL = Domain(low=0.0, high=1.0, high_open=True, text="in [0, 1)")
CLOSED_UNIT_INTERVAL = Domain(low=0.0, high=1.0, text="in [0, 1]")


def as_hyperparameter(
    value: ScalarOrSchedule, *, name: str, domain: Domain = REAL
) -> Hyperparameter:
    """A float becomes a float32 scalar array; a schedule stays a schedule.

    Raises if a concrete value is not a finite real scalar in ``domain``,
    naming the argument and the value. Schedules and traced values are
    checked by nobody: their values are only known at run time.
    """
    if _is_schedule(value) or isinstance(value, jax.core.Tracer):
        return value
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a float or a schedule, got {type(value).__name__}"
        ) from err
    if array.shape != () or not (
        jnp.issubdtype(array.dtype, jnp.floating)  # bfloat16 too
        or jnp.issubdtype(array.dtype, jnp.integer)
    ):
        raise ValueError(
            f"{name} must be a real scalar or a schedule, got "
            f"{array.dtype.name} array of shape {array.shape}"
        )
    if not np.isfinite(array):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if not domain.contains(float(array)):
        raise ValueError(f"{name} must be {domain.text}, got {value!r}")
    return jnp.asarray(array, dtype=jnp.float32)


def hyperparameter(name: str, domain: Domain = REAL) -> Any:
    """A Module field holding a hyperparameter (see :func:`as_hyperparameter`)."""
    return eqx.field(
        converter=functools.partial(as_hyperparameter, name=name, domain=domain),
        metadata={"hyperparameter": {"domain": domain}},
    )


def hyperparameter_fields(module: eqx.Module) -> dict[str, dict]:
    """The hyperparameter fields of ``module``: name -> their constraints."""
    return {
        f.name: f.metadata["hyperparameter"]
        for f in dataclasses.fields(module)
        if "hyperparameter" in f.metadata
    }


def resolve(value: Hyperparameter, count: Array, *, name: str) -> Array:
    """The hyperparameter's value at step ``count``: a float32 scalar array.

    A schedule that returns anything but a scalar is rejected at trace time.
    """
    if not _is_schedule(value):
        return value
    out = jnp.asarray(value(count))
    if out.shape != ():
        raise ValueError(
            f"the schedule given as {name} returned shape {out.shape} at step "
            "count; a schedule must return a scalar"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        out = out.astype(jnp.float32)
    return out


def cast_like(scalar: Array, leaf: Array) -> Array:
    """``scalar`` in ``leaf``'s dtype, as optax's weakly typed Python floats behave."""
    return scalar.astype(leaf.dtype)


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
