"""Adafactor's factored second moment: row and column statistics of ``g**2``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._hyperparams import (
    NONNEGATIVE,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import canonical_dtype, cast, promote, widened

DecayRateFn = Callable[[Array, Array], ArrayLike]


def _decay_rate_pow(step: ArrayLike, exponent: ArrayLike = 0.8) -> Array:
    """Adafactor's second-moment decay at ``step``: ``1 - (step + 1) ** -exponent``."""
    t = jnp.asarray(step + 1, jnp.float32)
    return 1.0 - t ** (-exponent)


def factored_dims(
    shape: tuple[int, ...], factored: bool, min_dim_size_to_factor: int
) -> tuple[int, int] | None:
    """``(d_col, d_row)``: the second largest and the largest dim, or None.

    A leaf is factored when ``factored`` is set, it has two dims or more, and
    its second largest dim has at least ``min_dim_size_to_factor`` elements.
    Ties go as ``np.argsort`` orders them (the later dim counts as larger).
    """
    if not factored or len(shape) < 2:
        return None
    by_size = np.argsort(shape)
    if shape[by_size[-2]] < min_dim_size_to_factor:
        return None
    return int(by_size[-2]), int(by_size[-1])


def as_step_offset(value: Any, name: str = "step_offset") -> Any:
    """``step_offset`` as an int32 leaf (changing it never recompiles)."""
    if isinstance(value, jax.core.Tracer):
        return value
    array = np.asarray(value)
    if (
        array.shape != ()
        or array.dtype == np.bool_
        or not np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if int(array) < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return jnp.asarray(array, jnp.int32)


class ScaleByFactoredRmsState(eqx.Module):
    """Adafactor's statistics, three trees laid out like the parameters.

    For a factored leaf, ``v_row`` is the moving mean of ``g**2`` over its
    largest dim and ``v_col`` over its second largest, each kept with size 1
    where it reduces, so the ZeRO plan shards them on the dims they keep;
    ``v`` is None there. For any other leaf ``v`` is the full second moment
    and ``v_row``, ``v_col`` are None.
    """

    count: Array
    v_row: Updates
    v_col: Updates
    v: Updates


class ScaleByFactoredRms(AbstractTransform):
    """Divide by a factored (row times column) estimate of the gradients' RMS.

    With ``beta_t = decay_rate_fn(count - step_offset, decay_rate)``
    (by default ``1 - (t + 1) ** -decay_rate``) and ``s = g**2 + epsilon``, a
    leaf factored on dims ``(c, r)`` (its two largest) keeps::

        R = beta_t R + (1 - beta_t) mean_r(s)     # the "row" statistic
        C = beta_t C + (1 - beta_t) mean_c(s)     # the "column" statistic
        u = g / sqrt(R / mean_c(R)) / sqrt(C)

    and any other leaf ``V = beta_t V + (1 - beta_t) s``, ``u = g / sqrt(V)``.
    Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", ICML 2018; for bounded decays (``decay_rate_fn``), Zhai et al.,
    "Scaling Vision Transformers", CVPR 2022.

    ``nu_dtype`` stores ``R``, ``C`` and ``V`` (default: each parameter's
    dtype): they are updated and used in float32 and rounded when stored.

    Partitioned parameter: the statistics are stored sharded on the dims they
    keep. Per step, each mean over a partitioned dim is a local partial sum
    plus one all-reduce of the statistic (the parameter's size over that dim's
    size); ``mean_c(R)`` adds one more of ``R``'s size reduced by dim ``c``
    when ``c`` is partitioned. Nothing of the parameter's size is gathered;
    unfactored leaves are elementwise and need no communication.
    """

    factored: bool = eqx.field(static=True)
    decay_rate: Hyperparameter = hyperparameter("decay_rate", NONNEGATIVE)
    step_offset: Array = eqx.field(converter=as_step_offset)
    min_dim_size_to_factor: int = eqx.field(static=True)
    epsilon: Hyperparameter = hyperparameter("epsilon", NONNEGATIVE)
    decay_rate_fn: DecayRateFn = eqx.field(static=True)
    nu_dtype: jnp.dtype | None = eqx.field(static=True, default=None)

    def _dims(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        return factored_dims(shape, self.factored, self.min_dim_size_to_factor)

    def init(self, params: Params) -> ScaleByFactoredRmsState:
        leaves, treedef = jax.tree.flatten(params)
        rows, cols, full = [], [], []
        for p in leaves:
            dims = self._dims(tuple(p.shape))
            dtype = self.nu_dtype or p.dtype
            if dims is None:
                rows.append(None)
                cols.append(None)
                full.append(jnp.zeros(p.shape, dtype))
                continue
            d_col, d_row = dims
            rows.append(jnp.zeros(_reduced(p.shape, d_row), dtype))
            cols.append(jnp.zeros(_reduced(p.shape, d_col), dtype))
            full.append(None)
        return ScaleByFactoredRmsState(
            zero_count(),
            treedef.unflatten(rows),
            treedef.unflatten(cols),
            treedef.unflatten(full),
        )

    def update(
        self,
        grads: Updates,
        state: ScaleByFactoredRmsState,
        params: Params | None = None,
    ) -> tuple[Updates, ScaleByFactoredRmsState]:
        del params  # the statistics carry the parameters' shapes and dtypes
        decay_rate = resolve(self.decay_rate, state.count, name="decay_rate")
        epsilon = resolve(self.epsilon, state.count, name="epsilon")
        beta = jnp.asarray(
            self.decay_rate_fn(state.count - self.step_offset, decay_rate)
        )
        if not jnp.issubdtype(beta.dtype, jnp.floating):
            beta = beta.astype(jnp.float32)
        leaves, treedef = jax.tree.flatten(grads)
        rows = treedef.flatten_up_to(state.v_row)
        cols = treedef.flatten_up_to(state.v_col)
        full = treedef.flatten_up_to(state.v)
        # with nu_dtype, the statistics are updated and used in float32 (the
        # gradient and the stored values widened), and rounded when stored
        rows, cols, full = (widened(t, self.nu_dtype) for t in (rows, cols, full))
        out = [[], [], [], []]
        for g, row, col, v in zip(leaves, rows, cols, full, strict=True):
            g = widened(g, self.nu_dtype)
            squared = g * g + epsilon.astype(g.dtype)
            dims = self._dims(tuple(g.shape))
            if dims is None:
                v = _average(v, squared, beta)
                u = g * v**-0.5
                row = col = None
            else:
                d_col, d_row = dims
                row = _average(row, jnp.mean(squared, d_row, keepdims=True), beta)
                col = _average(col, jnp.mean(squared, d_col, keepdims=True), beta)
                row_scale = (row / jnp.mean(row, d_col, keepdims=True)) ** -0.5
                u = g * row_scale * col**-0.5
                v = None
            for bucket, value in zip(out, (u, row, col, v), strict=True):
                bucket.append(value)
        updates, rows, cols, full = (treedef.unflatten(x) for x in out)
        rows, cols, full = (cast(t, self.nu_dtype) for t in (rows, cols, full))
        count = safe_increment(state.count)
        return updates, ScaleByFactoredRmsState(count, rows, cols, full)


def _reduced(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return tuple(1 if d == dim else n for d, n in enumerate(shape))


def _average(old: Array, new: Array, beta: Array) -> Array:
    """``beta * old + (1 - beta) * new`` in the promoted dtype, stored as ``old``."""
    b, old_ = promote(beta, old)
    c, new_ = promote(1.0 - beta, new)
    return jnp.add(*promote(b * old_, c * new_)).astype(old.dtype)


def check_min_dim(value: Any) -> int:
    """``min_dim_size_to_factor`` as a Python int >= 0 (it fixes shapes: static)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"min_dim_size_to_factor must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"min_dim_size_to_factor must be >= 0, got {value!r}")
    return int(value)


def scale_by_factored_rms(
    factored: bool = True,
    decay_rate: ScalarOrSchedule = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: ScalarOrSchedule = 1e-30,
    decay_rate_fn: DecayRateFn = _decay_rate_pow,
    *,
    nu_dtype: DTypeLike | None = None,
) -> ScaleByFactoredRms:
    """Rescale updates by Adafactor's factored estimate of the gradients' RMS.

    ``nu_dtype``: the dtype the statistics are stored in (default: each
    parameter's); a non-floating dtype is an error.
    """
    if not callable(decay_rate_fn):
        raise TypeError(
            f"decay_rate_fn must be a function (step, decay_rate) -> decay, got "
            f"{decay_rate_fn!r}"
        )
    return ScaleByFactoredRms(
        bool(factored),
        decay_rate,
        step_offset,
        check_min_dim(min_dim_size_to_factor),
        epsilon,
        decay_rate_fn,
        canonical_dtype(nu_dtype, "nu_dtype"),
    )
