"""Layer-wise scaling by parameter norms: trust ratios (LARS, LAMB, Fromage)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._base import AbstractCountingTransform, Params, Updates
from .._hyperparams import (
    NONNEGATIVE,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)
from .._tree_math import add, promote


def _needs_params(name: str) -> str:
    return f"{name} needs the parameters: call update(grads, state, params)."


def _safe(x: Array, floor: Array, statistic) -> Array:
    """``max(statistic(x), floor)``, with a zero gradient where the floor wins.

    Where the floor applies, the statistic is recomputed on ones, so that the
    derivative of a root at zero (NaN) never reaches the result.
    """
    value = statistic(x)
    small = value <= floor
    value = statistic(jnp.where(small, jnp.ones_like(x), x))
    return jnp.where(small, floor, value)


def safe_norm(x: Array, min_norm: Array) -> Array:
    """The L2 norm of all of ``x``'s elements, at least ``min_norm`` (x's dtype)."""
    l2 = lambda y: jnp.sqrt(jnp.sum(y * y))
    return _safe(x, min_norm.astype(x.dtype), l2)


def safe_rms(x: Array, min_rms: Array) -> Array:
    """The root mean square of ``x``'s elements, at least ``min_rms`` (x's dtype)."""
    rms = lambda y: jnp.sqrt(jnp.mean(y * y))
    return _safe(x, min_rms.astype(x.dtype), rms)


def _times(update: Array, factor: Array) -> Array:
    update, factor = promote(update, factor)
    return update * factor


class ScaleByTrustRatio(AbstractCountingTransform):
    """Scale each leaf's update by its trust ratio ``c ||p|| / (||u|| + eps)``.

    Norms are over the whole leaf and floored at ``min_norm``; where either
    norm is zero the ratio is 1, so such a leaf's update passes unchanged.

    You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks",
    arXiv:1708.03888, 2017 (LARS); You et al., "Large Batch Optimization for
    Deep Learning: Training BERT in 76 minutes", ICLR 2020 (LAMB).
    """

    min_norm: Hyperparameter = hyperparameter("min_norm", NONNEGATIVE)
    trust_coefficient: Hyperparameter = hyperparameter("trust_coefficient", NONNEGATIVE)
    eps: Hyperparameter = hyperparameter("eps", NONNEGATIVE)

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        if params is None:
            raise ValueError(_needs_params("scale_by_trust_ratio"))
        min_norm = resolve(self.min_norm, count, name="min_norm")
        coefficient = resolve(self.trust_coefficient, count, name="trust_coefficient")
        eps = resolve(self.eps, count, name="eps")

        def scale(u, p):
            param_norm = safe_norm(p, min_norm)
            update_norm = safe_norm(u, min_norm)
            numerator = coefficient.astype(param_norm.dtype) * param_norm
            denominator = update_norm + eps.astype(update_norm.dtype)
            numerator, denominator = promote(numerator, denominator)
            ratio = numerator / denominator
            either_zero = (param_norm == 0) | (update_norm == 0)
            one, ratio = promote(jnp.ones([], p.dtype), ratio)
            return _times(u, jnp.where(either_zero, one, ratio))

        return jax.tree.map(scale, grads, params)


class ScaleByParamBlockNorm(AbstractCountingTransform):
    """Scale each leaf's update by its parameter's L2 norm, at least ``min_scale``.

    ``u = max(||p||, min_scale) * u``, a block being one parameter leaf.
    """

    min_scale: Hyperparameter = hyperparameter("min_scale", NONNEGATIVE)

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        if params is None:
            raise ValueError(_needs_params("scale_by_param_block_norm"))
        floor = resolve(self.min_scale, count, name="min_scale")
        return jax.tree.map(lambda u, p: _times(u, safe_norm(p, floor)), grads, params)


class ScaleByParamBlockRms(AbstractCountingTransform):
    """Scale each leaf's update by its parameter's RMS, at least ``min_scale``.

    ``u = max(sqrt(mean(p^2)), min_scale) * u``, as Adafactor's relative step
    (Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost", ICML 2018).
    """

    min_scale: Hyperparameter = hyperparameter("min_scale", NONNEGATIVE)

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        if params is None:
            raise ValueError(_needs_params("scale_by_param_block_rms"))
        floor = resolve(self.min_scale, count, name="min_scale")
        return jax.tree.map(lambda u, p: _times(u, safe_rms(p, floor)), grads, params)


class FromageStep(AbstractCountingTransform):
    """Fromage's step after the trust ratio: ``u = -lr m u + (m - 1) p``.

    ``m = 1 / sqrt(1 + lr^2)``, so the parameters shrink by ``m`` as they move;
    ``m - 1`` is computed as ``-lr^2 / (r (1 + r))`` with ``r = sqrt(1 + lr^2)``,
    which keeps its float32 value accurate for small learning rates. One
    transform holds ``learning_rate`` so that changing it changes both parts.

    Bernstein et al., "On the distance between two neural networks and the
    stability of learning", NeurIPS 2020.
    """

    learning_rate: Hyperparameter = hyperparameter("learning_rate", NONNEGATIVE)

    def apply(self, grads: Updates, params: Params | None, count: Array) -> Updates:
        if params is None:
            raise ValueError(_needs_params("fromage"))
        rate = resolve(self.learning_rate, count, name="learning_rate")
        root = jnp.sqrt(1 + rate * rate)
        step = -(rate / root)
        shrink = -(rate * rate) / (root * (1 + root))
        return jax.tree.map(
            lambda g, p: add(step.astype(g.dtype) * g, shrink.astype(p.dtype) * p),
            grads,
            params,
        )


def scale_by_trust_ratio(
    min_norm: ScalarOrSchedule = 0.0,
    trust_coefficient: ScalarOrSchedule = 1.0,
    eps: ScalarOrSchedule = 0.0,
) -> ScaleByTrustRatio:
    """Scale each leaf's update by ``trust_coefficient * ||p|| / (||u|| + eps)``."""
    return ScaleByTrustRatio(min_norm, trust_coefficient, eps)


def scale_by_param_block_norm(
    min_scale: ScalarOrSchedule = 1e-3,
) -> ScaleByParamBlockNorm:
    """Scale each leaf's update by the L2 norm of its parameter."""
    return ScaleByParamBlockNorm(min_scale)


def scale_by_param_block_rms(
    min_scale: ScalarOrSchedule = 1e-3,
) -> ScaleByParamBlockRms:
    """Scale each leaf's update by the root mean square of its parameter."""
    return ScaleByParamBlockRms(min_scale)


def fromage_step(learning_rate: ScalarOrSchedule) -> FromageStep:
    """Fromage's learning-rate step and norm-preserving shrink, in one transform."""
    return FromageStep(learning_rate)
