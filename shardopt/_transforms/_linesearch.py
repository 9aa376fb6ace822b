"""Line searches that pick the step size by calling the objective: backtracking to
a sufficient decrease (Armijo), and what every line search shares: the extra
arguments, the objective's own keywords, and dot products over the tree."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._hyperparams import (
    NONNEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    Domain,
    Hyperparameter,
    ScalarOrSchedule,
    _is_schedule,
    as_hyperparameter,
    resolve,
)
from .._tree_math import contract, promote

OPEN_UNIT_INTERVAL = Domain(
    low=0.0, high=1.0, low_open=True, high_open=True, text="in (0, 1)"
)
AT_LEAST_ONE = Domain(low=1.0, text=">= 1")

# ---------------------------------------------------------------------------
# What the line searches share
# ---------------------------------------------------------------------------


def constant(
    name: str, domain: Domain, *, optional: bool = False, infinite: bool = False
) -> Any:
    """A float hyperparameter field; ``None`` kept when ``optional``, ``+inf``
    accepted when ``infinite`` (optax documents ``inf`` as a meaningful value)."""

    def convert(value: Any) -> Any:
        if value is None and optional:
            return None
        if infinite and not _is_schedule(value):
            try:
                is_inf = bool(np.isposinf(np.asarray(value, dtype=np.float64)))
            except (TypeError, ValueError):
                is_inf = False
            if is_inf:
                return jnp.asarray(np.inf, jnp.float32)
        return as_hyperparameter(value, name=name, domain=domain)

    return eqx.field(converter=convert, metadata={"hyperparameter": {"domain": domain}})


def step_count(name: str, minimum: int) -> Any:
    """An int32 array field (a new value never recompiles), at least ``minimum``."""

    def convert(value: ArrayLike) -> Array:
        if isinstance(value, jax.core.Tracer):
            return value
        try:
            integral = not isinstance(value, bool) and int(value) == value
        except (TypeError, ValueError):
            integral = False
        if not integral:
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        return jnp.asarray(int(value), jnp.int32)

    return eqx.field(converter=convert)


def require(who: str, **given: Any) -> None:
    """Raise a TypeError naming every one of ``given`` that is None."""
    missing = [name for name, value in given.items() if value is None]
    if missing:
        listed = ", ".join(f"{name}=" for name in missing)
        raise TypeError(
            f"{who} needs {listed} (the objective's value and gradient at params, "
            "and the objective value_fn itself, as keywords): call "
            "tx.update(grads, state, params, value=loss, grad=grads, "
            "value_fn=loss_fn) or opt.step(params, grads, value=loss, "
            "grad=grads, value_fn=loss_fn)"
        )


def bind_objective(
    value_fn: Callable[..., ArrayLike], extra_args: dict[str, Any], who: str
) -> Callable[[Params], ArrayLike]:
    """``value_fn`` with the extra arguments it names bound as keywords.

    Extra arguments it does not take are an error (unless it takes ``**kwargs``),
    so a misspelt batch argument is not silently dropped.
    """
    try:
        signature = inspect.signature(value_fn)
    except (TypeError, ValueError):
        signature = None
    if signature is None or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    ):
        taken = dict(extra_args)
    else:
        taken = {k: v for k, v in extra_args.items() if k in signature.parameters}
    unused = sorted(set(extra_args) - set(taken))
    if unused:
        raise TypeError(
            f"{who} got keyword arguments that value_fn does not take: {unused}; "
            "every extra keyword of update is passed to value_fn"
        )
    return lambda p: value_fn(p, **taken)


def value_dtype(params: Params) -> jnp.dtype:
    """The real dtype line searches keep values and step sizes in: at least f32."""
    dtype = jnp.dtype(jnp.float32)
    with jax.numpy_dtype_promotion("standard"):
        for leaf in jax.tree.leaves(params):
            dtype = jnp.promote_types(dtype, jnp.finfo(leaf.dtype).dtype)
    return dtype


def as_scalar(x: ArrayLike, dtype: jnp.dtype, name: str) -> Array:
    """``x`` as a scalar of ``dtype``; a size-1 array is accepted, others are not."""
    x = jnp.asarray(x)
    if x.size != 1:
        raise ValueError(f"{name} must be a scalar, got shape {x.shape}")
    return jnp.reshape(x, ()).real.astype(dtype)


def at_least_f32(dtype: jnp.dtype) -> jnp.dtype:
    """``dtype`` promoted with float32 (16-bit floats become float32)."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(dtype, jnp.float32)


def _leaf_vdot(x: Array, y: Array) -> Array:
    x, y = promote(x, y)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.conj(x)
    return contract(x, y, at_least_f32(x.dtype) if x.dtype.itemsize < 4 else None)


def tree_vdot(a: Updates, b: Updates) -> Array:
    """The real part of ``sum_i <conj(a_i), b_i>`` over all leaves.

    Each leaf is contracted over all its dims at the highest precision (16-bit
    leaves accumulate in float32), then the leaf sums are added in order. On
    partitioned arrays the contraction is global: the partitioner adds the
    per-shard sums.
    """
    total = None
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        dot = _leaf_vdot(x, y)
        total = dot if total is None else jnp.add(*promote(total, dot))
    return jnp.zeros([], jnp.float32) if total is None else jnp.real(total)


def tree_conj(tree: Updates) -> Updates:
    """Complex conjugate of every leaf (real leaves as they are)."""
    return jax.tree.map(jnp.conj, tree)


def axpy(x: Updates, a: Array, y: Updates) -> Updates:
    """``x + a * y`` leaf by leaf, computed in the promoted dtype, kept as ``x``'s."""

    def one(xi, yi):
        xi_, yi_, a_ = promote(xi, yi, a)
        return (xi_ + a_ * yi_).astype(xi.dtype)

    return jax.tree.map(one, x, y)


def scale_tree(a: Array, tree: Updates) -> Updates:
    """``a * tree`` leaf by leaf, each result in its leaf's dtype."""

    def one(x):
        x_, a_ = promote(x, a)
        return (a_ * x_).astype(x.dtype)

    return jax.tree.map(one, tree)


def where_tree(condition: Array, x: Any, y: Any) -> Any:
    """``jnp.where(condition, x, y)`` leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), x, y)


def report_if(condition: Array, message: str, **values: Array) -> None:
    """Print ``message`` (formatted with ``values``) when ``condition`` holds."""
    jax.lax.cond(
        condition,
        lambda v: jax.debug.print(message, ordered=True, **v),
        lambda v: None,
        values,
    )


# ---------------------------------------------------------------------------
# Backtracking
# ---------------------------------------------------------------------------


class BacktrackingLinesearchInfo(eqx.Module):
    """What the last search did: evaluations made, and the decrease error left
    (0 when the sufficient-decrease criterion was met)."""

    num_linesearch_steps: Array
    decrease_error: Array


class ScaleByBacktrackingLinesearchState(eqx.Module):
    """The step size, value (and, with ``store_grad``, gradient) the last search
    ended at; :func:`value_and_grad_from_state` reuses the value and gradient."""

    count: Array
    learning_rate: Array
    value: Array
    grad: Updates | None
    info: BacktrackingLinesearchInfo


class _Backtrack(eqx.Module):
    """The inner loop's carry."""

    learning_rate: Array
    new_value: Array
    new_grad: Updates | None
    decrease_error: Array
    iter_num: Array


class ScaleByBacktrackingLinesearch(AbstractTransform):
    r"""Scale the updates ``u`` by the first step size ``eta`` with sufficient decrease.

    ``f(w + eta u) <= (1 + rtol) f(w) + eta * slope_rtol * <u, grad f(w)> + atol``
    (Armijo's criterion). The first guess is
    ``min(increase_factor * eta_prev, max_learning_rate)``; each failure
    multiplies it by ``decrease_factor``, for at most ``max_backtracking_steps``
    evaluations after the first. When even the last value is not finite the
    step is 0. ``u`` must be a descent direction (``<u, grad f(w)> < 0``).

    Armijo, "Minimization of functions having Lipschitz continuous first partial
    derivatives", Pacific Journal of Mathematics 1966; Vaswani et al., "Painless
    Stochastic Gradient: Interpolation, Line-Search, and Convergence Rates",
    NeurIPS 2019.
    """

    max_backtracking_steps: Array = step_count("max_backtracking_steps", 0)
    slope_rtol: Hyperparameter = constant("slope_rtol", UNIT_INTERVAL)
    decrease_factor: Hyperparameter = constant("decrease_factor", OPEN_UNIT_INTERVAL)
    increase_factor: Hyperparameter = constant(
        "increase_factor", AT_LEAST_ONE, infinite=True
    )
    max_learning_rate: Hyperparameter = constant("max_learning_rate", POSITIVE)
    atol: Hyperparameter = constant("atol", NONNEGATIVE)
    rtol: Hyperparameter = constant("rtol", NONNEGATIVE)
    store_grad: bool = eqx.field(static=True)
    verbose: bool = eqx.field(static=True)
    takes_extra_args = True

    def init(self, params: Params) -> ScaleByBacktrackingLinesearchState:
        dtype = value_dtype(params)
        inf = jnp.asarray(jnp.inf, dtype)
        grad = jax.tree.map(jnp.zeros_like, params) if self.store_grad else None
        info = BacktrackingLinesearchInfo(jnp.zeros([], jnp.int32), inf)
        return ScaleByBacktrackingLinesearchState(
            zero_count(), jnp.ones([], dtype), inf, _zeros(params, grad), info
        )

    def update(
        self,
        grads: Updates,
        state: ScaleByBacktrackingLinesearchState,
        params: Params | None = None,
        *,
        value: ArrayLike | None = None,
        grad: Updates | None = None,
        value_fn: Callable[..., ArrayLike] | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, ScaleByBacktrackingLinesearchState]:
        who = "scale_by_backtracking_linesearch"
        require(who, params=params, value=value, grad=grad, value_fn=value_fn)
        objective = bind_objective(value_fn, extra_args, who)
        dtype = state.value.dtype
        read = lambda name: resolve(getattr(self, name), state.count, name=name)
        slope_rtol, decrease, increase, top, atol, rtol = (
            read(n).astype(dtype)
            for n in (
                "slope_rtol",
                "decrease_factor",
                "increase_factor",
                "max_learning_rate",
                "atol",
                "rtol",
            )
        )
        max_steps = self.max_backtracking_steps
        value = as_scalar(value, dtype, "value")
        slope = tree_vdot(grads, tree_conj(grad)).astype(dtype)

        def decrease_error(rate, new_value):
            err = new_value - (1 + rtol) * value - rate * slope_rtol * slope
            err = jnp.where(jnp.isnan(err), jnp.inf, err)
            return jnp.maximum(err, 0)

        def keep_going(c: _Backtrack) -> Array:
            return ~(c.decrease_error <= atol) & (c.iter_num <= max_steps)

        def body(c: _Backtrack) -> _Backtrack:
            rate = c.learning_rate
            rate = jnp.where(c.iter_num > 0, decrease * rate, rate)
            candidate = axpy(params, rate, grads)
            new_grad = c.new_grad
            if self.store_grad:
                # linearize: the value now, the gradient (a transpose) only
                # for the point the search ends at.
                raw, linear = jax.linearize(objective, candidate)
                new_value = as_scalar(raw, dtype, "value_fn's value")
                err = decrease_error(rate, new_value)
                last = (err <= atol) | (c.iter_num == max_steps)

                def pull_back(p):
                    return jax.linear_transpose(linear, p)(jnp.ones_like(raw))[0]

                new_grad = jax.lax.cond(
                    last, pull_back, lambda p: c.new_grad, candidate
                )
                new_grad = _cast_like(new_grad, c.new_grad)
            else:
                new_value = as_scalar(objective(candidate), dtype, "value_fn's value")
                err = decrease_error(rate, new_value)
            return _Backtrack(rate, new_value, new_grad, err, c.iter_num + 1)

        first = jnp.minimum(increase * state.learning_rate, top)
        start_grad = _zeros(params, state.grad)
        inf = jnp.asarray(jnp.inf, dtype)
        start = _Backtrack(first, value, start_grad, inf, jnp.zeros([], jnp.int32))
        final = jax.lax.while_loop(keep_going, body, start)

        failed_badly = jnp.isinf(final.decrease_error)
        rate = jnp.where(failed_badly, jnp.zeros([], dtype), final.learning_rate)
        if self.verbose:
            report_if(
                final.decrease_error > atol,
                "scale_by_backtracking_linesearch: no step size with sufficient "
                "decrease found (value {value}, slope {slope}, step size {rate}, "
                "decrease error {err}); a non-finite error means a step of 0",
                value=value,
                slope=slope,
                rate=final.learning_rate,
                err=final.decrease_error,
            )
        info = BacktrackingLinesearchInfo(final.iter_num, final.decrease_error)
        new_state = ScaleByBacktrackingLinesearchState(
            safe_increment(state.count),
            rate,
            final.new_value,
            final.new_grad if self.store_grad else None,
            info,
        )
        return scale_tree(rate, grads), new_state


def _zeros(params: Params, like: Updates | None) -> Updates | None:
    """Zeros like ``params`` in ``like``'s dtypes, or None when ``like`` is None."""
    if like is None:
        return None
    return jax.tree.map(lambda p, g: jnp.zeros(p.shape, g.dtype), params, like)


def _cast_like(tree: Any, reference: Any) -> Any:
    return jax.tree.map(lambda x, r: jnp.asarray(x).astype(r.dtype), tree, reference)


def scale_by_backtracking_linesearch(
    max_backtracking_steps: int,
    slope_rtol: ScalarOrSchedule = 1e-4,
    decrease_factor: ScalarOrSchedule = 0.8,
    increase_factor: ScalarOrSchedule = 1.5,
    max_learning_rate: ScalarOrSchedule = 1.0,
    atol: ScalarOrSchedule = 0.0,
    rtol: ScalarOrSchedule = 0.0,
    store_grad: bool = False,
    verbose: bool = False,
) -> ScaleByBacktrackingLinesearch:
    """Backtracking line search to a sufficient decrease (Armijo criterion).

    ``update`` takes the keywords ``value`` (the objective at ``params``),
    ``grad`` (its gradient there) and ``value_fn`` (the objective); other
    keywords are passed on to ``value_fn``. With ``store_grad=True`` the
    gradient at the accepted point is kept for
    :func:`value_and_grad_from_state`. ``increase_factor=inf`` starts every
    search at ``max_learning_rate``.
    """
    return ScaleByBacktrackingLinesearch(
        max_backtracking_steps,
        slope_rtol,
        decrease_factor,
        increase_factor,
        max_learning_rate,
        atol,
        rtol,
        bool(store_grad),
        bool(verbose),
    )
