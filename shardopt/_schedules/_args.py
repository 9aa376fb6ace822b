"""Checks shared by the schedule constructors: step counts and fractions."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array


def step_count(value: int, name: str, *, minimum: int = 0) -> Array:
    """``value`` as an int32 leaf, raising if it is not an integer ``>= minimum``."""
    try:
        integral = int(value) == value
    except (TypeError, ValueError):
        integral = False
    if not integral or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer number of steps, got {value!r}")
    if value < minimum:
        bound = "> 0" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return jnp.asarray(int(value), jnp.int32)


def fraction(value: float, name: str) -> float:
    """``value`` as a Python float in [0, 1], raising otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from err
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return number
