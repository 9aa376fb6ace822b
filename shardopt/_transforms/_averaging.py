"""Moving averages of the updates, and measurements of them kept in the state.

``ema`` replaces the updates by their (debiased) exponential moving average.
``snapshot``, ``monitor`` and ``measure_with_ema`` leave the updates alone and
record measurements of them (a norm, an average of one) in the state, where
``optax.tree.get(state, name)`` finds them. Every measurement has the same
shape and dtype from ``init`` on, so a jitted step never recompiles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, PyTree

from .._base import (
    AbstractStatelessTransform,
    AbstractTransform,
    Params,
    State,
    Updates,
    safe_increment,
    update_with_extra_args,
    zero_count,
)
from .._hyperparams import (
    UNIT_INTERVAL,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._interop import as_transform, is_transform
from .._tree_math import bias_correction, canonical_dtype, cast_like, zeros_like
from .._tree_math import ema as moving_average
from ._conditional import check_bool, check_callable

Measure = Callable[[Updates], PyTree]


class EmaState(eqx.Module):
    count: Array
    ema: Updates


class Ema(AbstractTransform):
    """The exponential moving average of the updates, optionally debiased.

    ``ema = (1 - decay) * g + decay * ema``; the update is ``ema``, or with
    ``debias`` ``ema / (1 - decay**t)`` at step ``t`` (Kingma & Ba, "Adam: A
    Method for Stochastic Optimization", ICLR 2015).
    """

    decay: Hyperparameter = hyperparameter("decay", UNIT_INTERVAL)
    debias: bool = eqx.field(static=True)
    accumulator_dtype: jnp.dtype | None = eqx.field(static=True)

    def init(self, params: Params) -> EmaState:
        return EmaState(zero_count(), zeros_like(params, self.accumulator_dtype))

    def update(
        self, grads: Updates, state: EmaState, params: Params | None = None
    ) -> tuple[Updates, EmaState]:
        del params
        decay = resolve(self.decay, state.count, name="decay")
        new = jax.tree.map(
            lambda g, m: moving_average(g, m, decay, 1), grads, state.ema
        )
        count = safe_increment(state.count)
        updates = (
            jax.tree.map(lambda m: bias_correction(m, decay, count), new)
            if self.debias
            else new
        )
        return updates, EmaState(count, cast_like(new, state.ema))


def ema(
    decay: ScalarOrSchedule,
    debias: bool = True,
    accumulator_dtype: DTypeLike | None = None,
) -> Ema:
    """Replace updates by their exponential moving average (debiased by default)."""
    return Ema(
        decay,
        check_bool(debias, "debias"),
        canonical_dtype(accumulator_dtype, "accumulator_dtype"),
    )


def _as_floats(tree: PyTree) -> PyTree:
    """Every leaf an array; bools and ints become float32 (so they average)."""

    def one(x):
        x = jnp.asarray(x)
        return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float32)

    return jax.tree.map(one, tree)


class MeasureWithEma(AbstractTransform):
    """The moving average of ``measure(updates)``, emitted in place of the updates.

    Meant as a measure of :func:`monitor`. A bool or int measurement is
    averaged as float32.
    """

    measure: Measure = eqx.field(static=True)
    ema: Ema

    def init(self, params: Params) -> EmaState:
        return self.ema.init(_as_floats(self.measure(params)))

    def update(
        self, grads: Updates, state: EmaState, params: Params | None = None
    ) -> tuple[PyTree, EmaState]:
        return self.ema.update(_as_floats(self.measure(grads)), state, params)


def measure_with_ema(
    measure: Measure,
    decay: ScalarOrSchedule,
    debias: bool = True,
    accumulator_dtype: DTypeLike | None = None,
) -> MeasureWithEma:
    """Record an exponential moving average of ``measure(updates)``; use in monitor.

    The average is shaped like ``measure(params)``; the transform's output is
    the average itself, which :func:`monitor` stores as the measurement.
    """
    return MeasureWithEma(
        check_callable(measure, "measure"), ema(decay, debias, accumulator_dtype)
    )


def _strong(tree: PyTree) -> PyTree:
    """Every leaf an array of a definite (not weak) dtype, so jit keys are stable."""
    return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.result_type(x)), tree)


def _kept_like(new: PyTree, old: PyTree, what: str) -> PyTree:
    """``new`` cast to ``old``'s dtypes; raises if its structure or shapes differ."""
    new = jax.tree.map(jnp.asarray, new)
    if jax.tree.structure(new) != jax.tree.structure(old) or any(
        n.shape != o.shape
        for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True)
    ):
        shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
        raise ValueError(
            f"the measurement {what} changed shape: it was {shapes(old)} at init "
            f"and is {shapes(new)} now; a measurement must keep its shape"
        )
    return cast_like(new, old)


class SnapshotState(eqx.Module):
    measurement: dict[str, PyTree]


class Snapshot(AbstractTransform):
    """Store ``measure(updates)`` under ``measure_name``; pass the updates on.

    At ``init`` the stored value is ``measure(params)``; later measurements
    keep its dtypes.
    """

    measure_name: str = eqx.field(static=True)
    measure: Measure = eqx.field(static=True)

    def init(self, params: Params) -> SnapshotState:
        value = _strong(self.measure(params))
        return SnapshotState({self.measure_name: value})

    def update(
        self, grads: Updates, state: SnapshotState, params: Params | None = None
    ) -> tuple[Updates, SnapshotState]:
        del params
        old = state.measurement[self.measure_name]
        new = _kept_like(self.measure(grads), old, repr(self.measure_name))
        return grads, SnapshotState({self.measure_name: new})


def snapshot(measure_name: str, measure: Measure) -> Snapshot:
    """Keep ``measure(updates)`` in the state under ``measure_name``, for debugging.

    In a chain it sees the updates as transformed so far; the updates pass
    through unchanged.
    """
    if not isinstance(measure_name, str):
        raise TypeError(f"measure_name must be a str, got {measure_name!r}")
    return Snapshot(measure_name, check_callable(measure, "measure"))


class _Stateless(AbstractStatelessTransform):
    """A measure given as a function, run as a transform with no state."""

    fn: Measure = eqx.field(static=True)

    def apply(self, grads: Updates, params: Params | None) -> PyTree:
        del params
        return self.fn(grads)


class MonitorState(eqx.Module):
    measurements: dict[str, PyTree]
    measure_states: tuple[State, ...]


class Monitor(AbstractTransform):
    """Run each measure on the updates and store its output; pass the updates on.

    A measure is a function of the updates or a transform whose output is the
    measurement (e.g. :func:`measure_with_ema`); extra arguments reach the
    transforms that take them. Measurements start as zeros shaped like each
    measure's output (found by tracing it once, on the parameters), and keep
    those dtypes.
    """

    names: tuple[str, ...] = eqx.field(static=True)
    measures: tuple[AbstractTransform, ...]
    takes_extra_args = True

    def _measure(self, updates, states, params, extra_args):
        pairs = [
            update_with_extra_args(m, updates, s, params, extra_args)
            for m, s in zip(self.measures, states, strict=True)
        ]
        return [p[0] for p in pairs], tuple(p[1] for p in pairs)

    def init(self, params: Params) -> MonitorState:
        states = tuple(m.init(params) for m in self.measures)
        shapes = jax.eval_shape(
            lambda p, s: self._measure(p, s, p, {})[0], params, states
        )
        zeros = [
            jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shape)
            for shape in shapes
        ]
        return MonitorState(dict(zip(self.names, zeros, strict=True)), states)

    def update(
        self,
        grads: Updates,
        state: MonitorState,
        params: Params | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, MonitorState]:
        values, states = self._measure(grads, state.measure_states, params, extra_args)
        measurements = {
            name: _kept_like(value, state.measurements[name], repr(name))
            for name, value in zip(self.names, values, strict=True)
        }
        return grads, MonitorState(measurements, states)


def monitor(measures: Mapping[str, Any]) -> Monitor:
    """Record several measurements of the updates, stateful ones included.

    ``measures`` maps names to functions of the updates or to transforms
    (shardopt or optax) whose output is the measurement, such as
    :func:`measure_with_ema`. Find a value with ``optax.tree.get(state, name)``
    or ``opt.state[...].measurements[name]``.
    """
    if not isinstance(measures, Mapping):
        raise TypeError(
            f"measures must be a dict of names to measures, got "
            f"{type(measures).__name__}"
        )
    names, transforms = [], []
    for name, measure in measures.items():
        if not isinstance(name, str):
            raise TypeError(f"monitor's measure names must be str, got {name!r}")
        if is_transform(measure):
            transforms.append(as_transform(measure, f"monitor's measure {name!r}"))
        elif callable(measure):
            transforms.append(_Stateless(measure))
        else:
            raise TypeError(
                f"monitor's measure {name!r} must be a function of the updates or "
                f"a transform, got {type(measure).__name__}"
            )
        names.append(name)
    return Monitor(tuple(names), tuple(transforms))
