"""The zoom line search: a step size with sufficient decrease and small curvature
(the strong Wolfe conditions), found by bracketing then interpolating."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._explicit import match_sharding
from .._hyperparams import (
    NONNEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    Domain,
    Hyperparameter,
    ScalarOrSchedule,
    _is_schedule,
    resolve,
)
from ._linesearch import (
    as_scalar,
    axpy,
    bind_objective,
    constant,
    report_if,
    require,
    scale_tree,
    step_count,
    tree_conj,
    tree_vdot,
    value_dtype,
    where_tree,
)

ABOVE_ONE = Domain(low=1.0, low_open=True, text="> 1")
GUESSES = ("one", "keep")


class ZoomLinesearchInfo(eqx.Module):
    """What the last search did: evaluations made, and the decrease and curvature
    errors left (0 where the criterion was met)."""

    num_linesearch_steps: Array
    decrease_error: Array
    curvature_error: Array


class ScaleByZoomLinesearchState(eqx.Module):
    """The step size, value and gradient the last search ended at;
    :func:`value_and_grad_from_state` reuses the value and gradient."""

    count: Array
    learning_rate: Array
    value: Array
    grad: Updates
    info: ZoomLinesearchInfo


class _Search(eqx.Module):
    """The inner loop's carry.

    ``low`` and ``high`` bracket an acceptable step once ``interval_found``;
    ``value(high) >= value(low)``, not ``high > low``. ``safe_*`` is the best
    point seen with sufficient decrease, taken when curvature cannot be met.
    """

    count: Array
    stepsize: Array
    value: Array
    grad: Updates
    slope: Array
    decrease_error: Array
    curvature_error: Array
    interval_found: Array
    done: Array
    failed: Array
    low: Array
    value_low: Array
    slope_low: Array
    high: Array
    value_high: Array
    slope_high: Array
    cubic_ref: Array
    value_cubic_ref: Array
    safe_stepsize: Array
    safe_value: Array
    safe_grad: Updates


def _cubic_minimizer(a, fa, fpa, b, fb, c, fc):
    """The critical point of the cubic through ``(a, fa)``, ``(b, fb)``, ``(c, fc)``
    with slope ``fpa`` at ``a``; NaN when it has none (then it is not used)."""
    db, dc = b - a, c - a
    # p(x) = A (x-a)^3 + B (x-a)^2 + fpa (x-a) + fa: solve for A, B (one 2x2
    # product, as SciPy's line search writes it).
    residuals = jnp.stack([fb - fa - fpa * db, fc - fa - fpa * dc])
    inverse = jnp.stack([jnp.stack([dc**2, -(db**2)]), jnp.stack([-(dc**3), db**3])])
    product = jnp.dot(inverse, residuals, precision=jax.lax.Precision.HIGHEST)
    cube, square = product / ((db * dc) ** 2 * (db - dc))
    radical = square * square - 3 * cube * fpa
    return a + (-square + jnp.sqrt(radical)) / (3 * cube)


def _quadratic_minimizer(a, fa, fpa, b, fb):
    """The critical point of the parabola through ``(a, fa)``, ``(b, fb)`` with
    slope ``fpa`` at ``a``."""
    db = b - a
    curvature = (fb - fa - fpa * db) / db**2
    return a - fpa / (2 * curvature)


class ScaleByZoomLinesearch(AbstractTransform):
    r"""Scale the updates ``u`` by a step ``eta`` meeting the strong Wolfe conditions.

    Sufficient decrease ``f(w + eta u) <= f(w) + slope_rtol * eta * s0 + tol``
    and small curvature ``|s(eta)| <= curv_rtol * |s0| + tol``, with
    ``s(eta) = <grad f(w + eta u), u>`` and ``s0 = s(0)``. Phase one grows the
    step from the initial guess by ``increase_factor`` (capped at
    ``max_learning_rate``) until an interval is bracketed; phase two shrinks
    it by cubic, quadratic or bisection steps. Near a minimum the decrease
    test also accepts Hager and Zhang's approximate form
    ``s(eta) <= (2 slope_rtol - 1) s0`` when
    ``f(w + eta u) <= f(w) + approx_dec_rtol |f(w)|`` (``None``: never). When
    curvature cannot be met, the best point with sufficient decrease is taken
    once the interval is shorter than ``stepsize_precision``.

    Nocedal & Wright, "Numerical Optimization", Springer 1999 (Algorithms 3.5,
    3.6); Hager & Zhang, "Algorithm 851: CG_DESCENT, a Conjugate Gradient Method
    with Guaranteed Descent", ACM Transactions on Mathematical Software 2006.
    """

    max_linesearch_steps: Array = step_count("max_linesearch_steps", 1)
    max_learning_rate: Hyperparameter | None = constant(
        "max_learning_rate", POSITIVE, optional=True
    )
    tol: Hyperparameter = constant("tol", NONNEGATIVE)
    increase_factor: Hyperparameter = constant("increase_factor", ABOVE_ONE)
    slope_rtol: Hyperparameter = constant("slope_rtol", UNIT_INTERVAL)
    curv_rtol: Hyperparameter = constant("curv_rtol", POSITIVE, infinite=True)
    approx_dec_rtol: Hyperparameter | None = constant(
        "approx_dec_rtol", NONNEGATIVE, optional=True
    )
    stepsize_precision: Hyperparameter = constant("stepsize_precision", NONNEGATIVE)
    initial_guess_strategy: str = eqx.field(static=True)
    verbose: bool = eqx.field(static=True)
    takes_extra_args = True

    def __check_init__(self):
        if self.initial_guess_strategy not in GUESSES:
            raise ValueError(
                "initial_guess_strategy must be 'one' or 'keep', got "
                f"{self.initial_guess_strategy!r}"
            )
        pair = (self.slope_rtol, self.curv_rtol)
        known = not any(_is_schedule(x) or isinstance(x, jax.core.Tracer) for x in pair)
        if known and not float(pair[0]) < float(pair[1]):
            raise ValueError(
                f"curv_rtol must be > slope_rtol, got curv_rtol="
                f"{float(pair[1])} and slope_rtol={float(pair[0])}"
            )

    def init(self, params: Params) -> ScaleByZoomLinesearchState:
        dtype = value_dtype(params)
        inf = jnp.asarray(jnp.inf, dtype)
        info = ZoomLinesearchInfo(jnp.zeros([], jnp.int32), inf, inf)
        grad = jax.tree.map(jnp.zeros_like, params)
        return ScaleByZoomLinesearchState(
            zero_count(), jnp.ones([], dtype), inf, grad, info
        )

    def update(
        self,
        grads: Updates,
        state: ScaleByZoomLinesearchState,
        params: Params | None = None,
        *,
        value: ArrayLike | None = None,
        grad: Updates | None = None,
        value_fn: Callable[..., ArrayLike] | None = None,
        **extra_args: Any,
    ) -> tuple[Updates, ScaleByZoomLinesearchState]:
        who = "scale_by_zoom_linesearch"
        require(who, params=params, value=value, grad=grad, value_fn=value_fn)
        objective = jax.value_and_grad(bind_objective(value_fn, extra_args, who))
        dtype = state.value.dtype
        grad = jax.tree.map(
            lambda g, p: match_sharding(g.astype(p.dtype), p), grad, params
        )
        value = as_scalar(value, dtype, "value")
        slope = tree_vdot(grads, grad).astype(dtype)
        start = self._start(state, value, grad, slope)
        search = _Zoom(self, state, objective, params, grads, value, slope)
        final = jax.lax.while_loop(search.keep_going, search.step, start)
        rate = final.stepsize
        info = ZoomLinesearchInfo(
            final.count, final.decrease_error, final.curvature_error
        )
        new_state = ScaleByZoomLinesearchState(
            safe_increment(state.count), rate, final.value, final.grad, info
        )
        return scale_tree(rate, grads), new_state

    def _start(self, state, value, grad, slope) -> _Search:
        dtype = value.dtype
        zero = jnp.zeros([], dtype)
        inf = jnp.asarray(jnp.inf, dtype)
        false = jnp.asarray(False)
        return _Search(
            count=jnp.zeros([], jnp.int32),
            stepsize=zero,
            value=value,
            grad=grad,
            slope=slope,
            decrease_error=inf,
            curvature_error=inf,
            interval_found=false,
            done=false,
            failed=false,
            low=zero,
            value_low=value,
            slope_low=slope,
            high=zero,
            value_high=value,
            slope_high=slope,
            cubic_ref=zero,
            value_cubic_ref=value,
            safe_stepsize=zero,
            safe_value=value,
            safe_grad=grad,
        )


class _Zoom:
    """One search: the constants of this step, and the two phases as loop bodies."""

    def __init__(self, ls, state, objective, params, updates, value, slope):
        dtype = state.value.dtype

        def read(name):
            x = getattr(ls, name)
            if x is None:
                return None
            return resolve(x, state.count, name=name).astype(dtype)

        self.ls = ls
        self.dtype = dtype
        self.objective = objective
        self.params, self.updates = params, updates
        self.value_init, self.slope_init = value, slope
        self.max_steps = ls.max_linesearch_steps
        self.max_stepsize = read("max_learning_rate")
        self.tol = read("tol")
        self.increase = read("increase_factor")
        self.slope_rtol = read("slope_rtol")
        self.curv_rtol = read("curv_rtol")
        self.approx_dec_rtol = read("approx_dec_rtol")
        self.precision = read("stepsize_precision")
        # "one" suits (quasi-)Newton directions, "keep" gradient steps.
        if ls.initial_guess_strategy == "one":
            self.guess = jnp.ones([], dtype)
        else:
            self.guess = state.learning_rate

    # -- the objective along the line and the two criteria
    def on_line(self, stepsize):
        point = axpy(self.params, stepsize, self.updates)
        raw, grad = self.objective(point)
        grad = jax.tree.map(lambda g, p: g.astype(p.dtype), grad, self.params)
        slope = tree_vdot(tree_conj(grad), self.updates).astype(self.dtype)
        return as_scalar(raw, self.dtype, "value_fn's value"), grad, slope

    def decrease_error(self, stepsize, value, slope):
        v0, s0, c1 = self.value_init, self.slope_init, self.slope_rtol
        err = value - v0 - c1 * stepsize * s0
        if self.approx_dec_rtol is not None:
            approx = slope - (2 * c1 - 1) * s0
            above = value - v0 - self.approx_dec_rtol * jnp.abs(v0)
            err = jnp.minimum(jnp.maximum(approx, above), err)
        err = jnp.maximum(err, 0)
        return jnp.where(jnp.isnan(err), jnp.inf, err)

    def curvature_error(self, slope):
        err = jnp.abs(slope) - self.curv_rtol * jnp.abs(self.slope_init)
        err = jnp.maximum(err, 0)
        return jnp.where(jnp.isnan(err), jnp.inf, err)

    # -- the loop
    def keep_going(self, s: _Search) -> Array:
        return ~(s.done | s.failed)

    def step(self, s: _Search) -> _Search:
        s = jax.lax.cond(s.interval_found, self.zoom, self.bracket, s)
        return jax.lax.cond(s.failed, self.settle, lambda x: x, s)

    def bracket(self, s: _Search) -> _Search:
        """Phase one (Algorithm 3.5): grow the step until an interval is found."""
        first = s.count == 0
        new = jnp.where(first, self.guess, self.increase * s.stepsize)
        if self.max_stepsize is not None:
            at_max = new >= self.max_stepsize
            new = jnp.minimum(new, self.max_stepsize)
        else:
            at_max = jnp.asarray(False)
        value, grad, slope = self.on_line(new)
        dec = self.decrease_error(new, value, slope)
        curv = self.curvature_error(slope)
        error = jnp.maximum(dec, curv)
        safe = dec <= self.tol
        safe_stepsize, safe_value, safe_grad = where_tree(
            safe,
            (new, value, grad),
            (s.safe_stepsize, s.safe_value, s.safe_grad),
        )
        high_is_new = (dec > 0) | ((value >= s.value) & ~first)
        low_is_new = (slope >= 0) & ~high_is_new
        previous = (s.stepsize, s.value, s.slope)
        current = (new, value, slope)
        low, value_low, slope_low = where_tree(low_is_new, current, previous)
        high, value_high, slope_high = where_tree(low_is_new, previous, current)
        found = high_is_new | low_is_new | (error <= self.tol)
        done = (error <= self.tol) | (at_max & ~found)
        if self.ls.verbose:
            report_if(
                at_max & ~found,
                "scale_by_zoom_linesearch: no interval meets the curvature "
                "condition below max_learning_rate; taking step size {stepsize} "
                "(decrease error {dec}, curvature error {curv})",
                stepsize=new,
                dec=dec,
                curv=curv,
            )
        failed = (s.count + 1 >= self.max_steps) & ~done
        return _Search(
            count=safe_increment(s.count),
            stepsize=new,
            value=value,
            grad=grad,
            slope=slope,
            decrease_error=dec,
            curvature_error=curv,
            interval_found=found,
            done=done,
            failed=failed,
            low=low,
            value_low=value_low,
            slope_low=slope_low,
            high=high,
            value_high=value_high,
            slope_high=slope_high,
            cubic_ref=low,
            value_cubic_ref=value_low,
            safe_stepsize=safe_stepsize,
            safe_value=safe_value,
            safe_grad=safe_grad,
        )

    def zoom(self, s: _Search) -> _Search:
        """Phase two (Algorithm 3.6): shrink the interval around an acceptable step."""
        width = jnp.abs(s.high - s.low)
        left, right = jnp.minimum(s.high, s.low), jnp.maximum(s.high, s.low)
        cubic = _cubic_minimizer(
            s.low,
            s.value_low,
            s.slope_low,
            s.high,
            s.value_high,
            s.cubic_ref,
            s.value_cubic_ref,
        )
        use_cubic = (cubic > left + 0.2 * width) & (cubic < right - 0.2 * width)
        quad = _quadratic_minimizer(
            s.low, s.value_low, s.slope_low, s.high, s.value_high
        )
        quad_ok = (quad > left + 0.1 * width) & (quad < right - 0.1 * width)
        use_quad = ~use_cubic & quad_ok
        middle = jnp.where(use_cubic, cubic, s.cubic_ref)
        middle = jnp.where(use_quad, quad, middle)
        middle = jnp.where(~use_cubic & ~use_quad, (s.low + s.high) / 2, middle)

        value, grad, slope = self.on_line(middle)
        dec = self.decrease_error(middle, value, slope)
        curv = self.curvature_error(slope)
        error = jnp.maximum(dec, curv)
        better = (dec <= self.tol) & (value < s.safe_value)
        safe_stepsize, safe_value, safe_grad = where_tree(
            better,
            (middle, value, grad),
            (s.safe_stepsize, s.safe_value, s.safe_grad),
        )
        done = error <= self.tol

        high_is_middle = (dec > 0) | (value >= s.value_low)
        high_is_low = (slope * (s.high - s.low) >= 0) & ~high_is_middle
        current = (middle, value, slope)
        old_low = (s.low, s.value_low, s.slope_low)
        old_high = (s.high, s.value_high, s.slope_high)
        high = where_tree(high_is_middle, current, old_high)
        high = where_tree(high_is_low, old_low, high)
        low = where_tree(~high_is_middle, current, old_low)
        # The point that just left the interval is the next cubic's third point.
        cubic_ref, value_cubic_ref = where_tree(
            high_is_middle | high_is_low,
            (s.high, s.value_high),
            (s.low, s.value_low),
        )
        # Stop on the step budget, or once the interval is below the precision
        # and a step with sufficient decrease exists (steep functions may need
        # a tiny step: without one, go on).
        out_of_steps = s.count + 1 >= self.max_steps
        too_narrow = (width <= self.precision) & (safe_stepsize > 0)
        failed = (out_of_steps | too_narrow) & ~done
        return _Search(
            count=safe_increment(s.count),
            stepsize=middle,
            value=value,
            grad=grad,
            slope=slope,
            decrease_error=dec,
            curvature_error=curv,
            interval_found=s.interval_found,
            done=done,
            failed=failed,
            low=low[0],
            value_low=low[1],
            slope_low=low[2],
            high=high[0],
            value_high=high[1],
            slope_high=high[2],
            cubic_ref=cubic_ref,
            value_cubic_ref=value_cubic_ref,
            safe_stepsize=safe_stepsize,
            safe_value=safe_value,
            safe_grad=safe_grad,
        )

    def settle(self, s: _Search) -> _Search:
        """After a failed search: the safe point if there is one (or if the last
        point is not even finite), else the last point tried."""
        nowhere = jnp.isinf(s.decrease_error)
        stepsize, value, grad = where_tree(
            (s.safe_stepsize > 0) | nowhere,
            (s.safe_stepsize, s.safe_value, s.safe_grad),
            (s.stepsize, s.value, s.grad),
        )
        if self.ls.verbose:
            jax.debug.print(
                "scale_by_zoom_linesearch: stopped at step size {stepsize} "
                "(decrease error {dec}, curvature error {curv}, slope at 0 "
                "{slope}); taking step size {taken}. A slope >= 0 is not a "
                "descent direction; a step of 0 means no finite value was found",
                stepsize=s.stepsize,
                dec=s.decrease_error,
                curv=s.curvature_error,
                slope=self.slope_init,
                taken=stepsize,
                ordered=True,
            )
        fields = lambda x: (x.stepsize, x.value, x.grad)
        return eqx.tree_at(fields, s, (stepsize, value, grad))


def scale_by_zoom_linesearch(
    max_linesearch_steps: int,
    max_learning_rate: ScalarOrSchedule | None = None,
    tol: ScalarOrSchedule = 0.0,
    increase_factor: ScalarOrSchedule = 2.0,
    slope_rtol: ScalarOrSchedule = 1e-4,
    curv_rtol: ScalarOrSchedule = 0.9,
    approx_dec_rtol: ScalarOrSchedule | None = 1e-6,
    stepsize_precision: ScalarOrSchedule = 1e-5,
    initial_guess_strategy: str = "keep",
    verbose: bool = False,
) -> ScaleByZoomLinesearch:
    """Zoom line search to the strong Wolfe conditions.

    ``update`` takes the keywords ``value`` (the objective at ``params``),
    ``grad`` (its gradient there) and ``value_fn`` (the objective); other
    keywords are passed on to ``value_fn``. The value and gradient at the
    accepted point are kept for :func:`value_and_grad_from_state`. The first
    guess is 1 (``initial_guess_strategy="one"``, for quasi-Newton directions)
    or the last step size (``"keep"``). ``curv_rtol=inf`` drops the curvature
    condition.
    """
    return ScaleByZoomLinesearch(
        max_linesearch_steps,
        max_learning_rate,
        tol,
        increase_factor,
        slope_rtol,
        curv_rtol,
        approx_dec_rtol,
        stepsize_precision,
        initial_guess_strategy,
        bool(verbose),
    )
