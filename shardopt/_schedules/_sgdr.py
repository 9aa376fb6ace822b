"""Stochastic gradient descent with warm restarts: cosine cycles one after another."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping

from ._args import step_count
from ._basic import Join, join_schedules, warmup_cosine_decay_schedule

_CYCLE = inspect.signature(warmup_cosine_decay_schedule)


def sgdr_schedule(cosine_kwargs: Iterable[Mapping[str, float]]) -> Join:
    """Restart a warmup-cosine cycle after each one ends.

    Cycle ``i`` is ``warmup_cosine_decay_schedule(**cosine_kwargs[i])``, run from
    the step where cycle ``i - 1`` ended, counting from 0; its ``decay_steps``
    (warmup included) is its length. The last cycle's final value holds after
    it ends.

    Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts",
    ICLR 2017.
    """
    cycles, boundaries, start = [], [], 0
    for i, kwargs in enumerate(cosine_kwargs):
        where = f"cosine_kwargs[{i}]"
        if not isinstance(kwargs, Mapping):
            raise TypeError(
                f"{where} must be a dict of warmup_cosine_decay_schedule "
                f"arguments, got {type(kwargs).__name__}"
            )
        try:
            bound = _CYCLE.bind(**kwargs)
        except TypeError as err:
            raise TypeError(
                f"{where} does not fit warmup_cosine_decay_schedule: {err}"
            ) from err
        bound.apply_defaults()
        warmup = int(
            step_count(bound.arguments["warmup_steps"], f"{where} warmup_steps")
        )
        length = int(step_count(bound.arguments["decay_steps"], f"{where} decay_steps"))
        if length <= warmup:
            raise ValueError(
                f"{where} decay_steps must be > its warmup_steps ({warmup}): it "
                f"counts the warmup too; got {length}"
            )
        cycles.append(warmup_cosine_decay_schedule(*bound.args, **bound.kwargs))
        start += length
        boundaries.append(start)
    if not cycles:
        raise ValueError("cosine_kwargs must hold at least one cycle, got none")
    return join_schedules(cycles, boundaries[:-1])
