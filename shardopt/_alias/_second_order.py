"""Quasi-Newton optimizers: L-BFGS with a line search."""

from __future__ import annotations

from typing import Any

from .._base import AbstractTransform, identity
from .._hyperparams import ScalarOrSchedule
from .._interop import as_transform
from .._transforms._combinators import Chain, chain
from .._transforms._lbfgs import scale_by_lbfgs
from .._transforms._scale import scale, scale_by_learning_rate
from .._transforms._zoom_linesearch import scale_by_zoom_linesearch


class _DefaultLinesearch:
    """lbfgs's default line search, built when lbfgs is called (not at import)."""

    def __repr__(self) -> str:
        return (
            "scale_by_zoom_linesearch(max_linesearch_steps=20, "
            "initial_guess_strategy='one')"
        )


DEFAULT_LINESEARCH = _DefaultLinesearch()


def lbfgs(
    learning_rate: ScalarOrSchedule | None = None,
    memory_size: int = 10,
    scale_init_precond: bool = True,
    linesearch: AbstractTransform | Any | None = DEFAULT_LINESEARCH,
) -> Chain:
    """L-BFGS: the gradient preconditioned by :func:`scale_by_lbfgs`, then a step.

    The step is ``-learning_rate`` times the direction (``-1`` when
    ``learning_rate`` is None), then scaled by ``linesearch`` (by default a zoom
    line search from step size 1, up to 20 evaluations; ``None`` for none).
    With a line search, ``update`` takes ``value=``, ``grad=`` and
    ``value_fn=``; :func:`value_and_grad_from_state` reuses the line search's
    last value and gradient.

    Liu & Nocedal, "On the limited memory BFGS method for large scale
    optimization", Mathematical Programming 1989; Nocedal & Wright, "Numerical
    Optimization", Springer 1999 (Algorithms 7.4, 7.5).
    """
    if learning_rate is None:
        step = scale(-1.0)
    else:
        step = scale_by_learning_rate(learning_rate)
    if linesearch is DEFAULT_LINESEARCH:
        linesearch = scale_by_zoom_linesearch(
            max_linesearch_steps=20, initial_guess_strategy="one"
        )
    elif linesearch is None:
        linesearch = identity()
    else:
        linesearch = as_transform(linesearch, "linesearch (lbfgs's)")
    return chain(scale_by_lbfgs(memory_size, scale_init_precond), step, linesearch)
