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


def hyperparameter(
    name: str,
    domain: Domain = REAL,
    *,
    guards_division_with: tuple[str, ...] | None = None,
) -> Any:
    """A Module field holding a hyperparameter (see :func:`as_hyperparameter`).

    ``guards_division_with`` declares that this hyperparameter (an ``eps``),
    together with the named ones (``eps_root``, an initial accumulator), is
    all that keeps a denominator from zero when the gradients are zero: their
    sum must be > 0, or a zero gradient gives ``0 / 0 = NaN``. Transforms check
    it at construction (:func:`check_division_guards`).
    """
    meta: dict[str, Any] = {"domain": domain}
    if guards_division_with is not None:
        meta["guards_division_with"] = tuple(guards_division_with)
    return eqx.field(
        converter=functools.partial(as_hyperparameter, name=name, domain=domain),
        metadata={"hyperparameter": meta},
    )


def check_division_guards(module: eqx.Module) -> None:
    """Raise if the hyperparameters that guard a division are all zero.

    Schedules and traced values are not checked (their values come at run time).
    """
    for field in dataclasses.fields(module):
        meta = field.metadata.get("hyperparameter", {})
        others = meta.get("guards_division_with")
        if others is None:
            continue
        names = (field.name, *others)
        values = [getattr(module, n, None) for n in names]
        if any(_is_schedule(v) or isinstance(v, jax.core.Tracer) for v in values):
            continue
        if any(v is None for v in values):
            continue
        numbers = [float(np.asarray(v)) for v in values]
        if sum(numbers) <= 0:
            given = ", ".join(f"{n}={x!r}" for n, x in zip(names, numbers, strict=True))
            raise ValueError(
                f"{type(module).__name__}: {' + '.join(names)} must be > 0, got "
                f"{given}: they keep a denominator from zero, and a zero "
                f"gradient would give 0/0 = NaN. Use e.g. {field.name}=1e-8."
            )


def as_count(value: Any, *, name: str, low: int = 0, high: int | None = None) -> int:
    """An integer argument (a stage, a size, a number of steps), checked.

    Rejects strings, bools, and floats that are not whole numbers, naming the
    argument and the value, instead of letting ``int()`` turn ``"2"`` or
    ``2.7`` into 2.
    """
    whole = isinstance(value, (float, np.floating)) and float(value).is_integer()
    if isinstance(value, bool) or not (isinstance(value, (int, np.integer)) or whole):
        raise TypeError(f"{name} must be an int, got {value!r}")
    number = int(value)
    if number < low or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return number


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
