"""Types shared by the catalogue constructors."""

from __future__ import annotations

from collections.abc import Callable

from .._base import Params

Mask = Params | Callable[[Params], Params] | None
"""A tree of bools like the parameters, or a function of them that returns one."""
