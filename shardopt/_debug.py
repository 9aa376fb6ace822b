"""``debug_nans()``: name the first leaf and step where an update went non-finite.

Inside the context, every :meth:`Optimizer.step` *traced* there also checks,
per trainable leaf, that the gradient and the update are finite (one
``isfinite`` reduction a leaf, then a host callback with a vector of flags).
The first step with a non-finite update raises :class:`NonFiniteError` naming
the step (the optimizer's count before it), the first such leaf in tree order,
every other one, and whether the gradient was already non-finite there (the
model's fault) or only the update (the optimizer's: a zero denominator, an
overflow). The event is also logged and kept in ``.first``.

A jitted step compiles the check in only if it is traced inside the context:
enter it before the first call (or clear the cache with ``jax.clear_caches()``).

What the caller gets is always :class:`NonFiniteError` with this message.
Called eagerly, the check raises it during the step. In a traced step
(``jax.jit``, ``eqx.filter_jit``, a ZeRO plan's sharded step) an exception
raised in the host callback would reach the caller wrapped in JAX's runtime
error and would stay in JAX's runtime tokens, failing every later
``jax.effects_barrier()``; so there the callback only records the event, and
the context raises :class:`NonFiniteError` when the ``with`` block ends (after
waiting for the steps still running), or earlier where the caller asks with
``nans.check()``. The steps after the first bad one still run; the error names
the first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from ._tree import leaf_paths

LOG = logging.getLogger("shardopt")
_MARK = "shardopt.debug_nans"


class NonFiniteError(FloatingPointError):
    """An update went non-finite while :func:`debug_nans` was active."""


@dataclasses.dataclass
class NonFiniteEvent:
    """Where an update first went non-finite."""

    step: int
    leaf: str
    leaves: list[str]
    gradient_finite: bool

    def message(self) -> str:
        cause = (
            "its gradient is finite, so the optimizer made it (a zero "
            "denominator, an overflow, a bad hyperparameter?)"
            if self.gradient_finite
            else "its gradient was already non-finite (the loss or the model)"
        )
        others = ", ".join(self.leaves[:10]) + (" ..." if len(self.leaves) > 10 else "")
        return (
            f"{_MARK}: at step {self.step} the update of {self.leaf} "
            f"is not finite; {cause}. Non-finite updates at this step: {others}"
        )


@dataclasses.dataclass
class DebugNans:
    """The active debug mode: ``first`` holds the first event, if any."""

    raise_error: bool = True
    first: NonFiniteEvent | None = None
    undelivered: bool = False  # found in a traced step, not yet raised

    def check(self) -> None:
        """Raise now the error a traced step found, if any (waits for the steps
        still running; the ``with`` block does this as it ends)."""
        jax.effects_barrier()
        if self.undelivered:
            self.undelivered = False
            raise NonFiniteError(self.first.message())


_ACTIVE: list[DebugNans] = []


@contextlib.contextmanager
def debug_nans(raise_error: bool = True) -> Iterator[DebugNans]:
    """Check every Optimizer step traced inside for non-finite updates.

    Example::

        params = {"w": jnp.ones(3)}
        opt = shardopt.Optimizer(shardopt.sgd(0.1), params)
        grads = {"w": jnp.array([1.0, jnp.nan, 0.0])}
        with shardopt.debug_nans(raise_error=False) as nans:  # default: raise
            params, opt = opt.step(params, grads)
        print(nans.first)  # NonFiniteEvent(step=0, leaf="['w']", ...)

    Args:
        raise_error: raise :class:`NonFiniteError` at the first event (default:
            during an eager step; for a traced step when the block ends or at
            ``nans.check()``); ``False`` only logs it and records it in
            ``.first``.
    """
    mode = DebugNans(raise_error)
    _ACTIVE.append(mode)
    try:
        yield mode
        jax.effects_barrier()  # the checks of traced steps still running
    except Exception as err:
        if mode.undelivered and not isinstance(err, NonFiniteError):
            err.add_note(mode.first.message())
        raise
    finally:
        _ACTIVE.remove(mode)
    mode.check()


def active() -> bool:
    """Whether a step traced now should carry the check."""
    return bool(_ACTIVE)


def check_step(count: Array, grads: PyTree, updates: PyTree) -> None:
    """Stage the check of one step's gradients and updates (see module doc).

    The callback reports to the context active when the step *runs* (a jitted
    step traced in one context and called in another reports to the second);
    outside any context it does nothing.
    """
    grad_leaves = leaf_paths(grads)
    update_leaves = leaf_paths(updates)
    paths = [p for p in update_leaves if p in grad_leaves]

    def flags(leaves: dict) -> Array:
        if not paths:
            return jnp.ones((0,), bool)
        return jnp.stack([jnp.all(jnp.isfinite(leaves[p])) for p in paths])

    def on_host(grad_ok: np.ndarray, update_ok: np.ndarray, step: np.ndarray) -> None:
        if not _ACTIVE or bool(np.all(update_ok)):
            return
        mode = _ACTIVE[-1]
        bad = [p for p, ok in zip(paths, update_ok, strict=True) if not ok]
        event = NonFiniteEvent(
            step=int(step),
            leaf=bad[0],
            leaves=bad,
            gradient_finite=bool(grad_ok[paths.index(bad[0])]),
        )
        if mode.first is None:
            mode.first = event
            LOG.error("%s", event.message())
        if not mode.raise_error:
            return
        if traced:  # raising here would leave JAX's runtime tokens failed
            mode.undelivered = True
        else:
            raise NonFiniteError(event.message())

    traced = isinstance(count, jax.core.Tracer)
    jax.debug.callback(on_host, flags(grad_leaves), flags(update_leaves), count)
