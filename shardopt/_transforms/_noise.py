"""Annealed Gaussian gradient noise, its PRNG key carried in the state."""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from .._base import AbstractTransform, Params, Updates, safe_increment, zero_count
from .._hyperparams import (
    NONNEGATIVE,
    Hyperparameter,
    ScalarOrSchedule,
    hyperparameter,
    resolve,
)


class AddNoiseState(eqx.Module):
    count: Array
    rng_key: Array  # the raw key data (uint32), so it saves and shards as an array


class AddNoise(AbstractTransform):
    """Add Gaussian noise whose variance decays with the step: ``g + sigma_t z``.

    ``sigma_t^2 = eta / t^gamma`` at step ``t = 1, 2, ...`` and ``z ~ N(0, 1)``
    drawn independently for every leaf (in the leaf's dtype) from a key that is
    split at every step.

    Neelakantan et al., "Adding Gradient Noise Improves Learning for Very Deep
    Networks", ICLR Workshop 2016.
    """

    eta: Hyperparameter = hyperparameter("eta", NONNEGATIVE)
    gamma: Hyperparameter = hyperparameter("gamma", NONNEGATIVE)
    key_data: Array = eqx.field(converter=jnp.asarray)  # the initial key's data
    key_impl: str = eqx.field(static=True)

    def init(self, params: Params) -> AddNoiseState:
        del params
        return AddNoiseState(zero_count(), self.key_data)

    def update(
        self, grads: Updates, state: AddNoiseState, params: Params | None = None
    ) -> tuple[Updates, AddNoiseState]:
        del params
        count = safe_increment(state.count)
        eta = resolve(self.eta, state.count, name="eta")
        gamma = resolve(self.gamma, state.count, name="gamma")
        std = jnp.sqrt(eta / count.astype(gamma.dtype) ** gamma)
        key = jax.random.wrap_key_data(state.rng_key, impl=self.key_impl)
        key, sample = jax.random.split(key)
        leaves, treedef = jax.tree.flatten(grads)
        keys = jax.random.split(sample, len(leaves))
        noisy = [
            g + std.astype(g.dtype) * jax.random.normal(k, g.shape, g.dtype)
            for g, k in zip(leaves, keys, strict=True)
        ]
        new_state = AddNoiseState(count, jax.random.key_data(key))
        return jax.tree.unflatten(treedef, noisy), new_state


def _as_key(key: ArrayLike) -> Array:
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(
        key.dtype, jax.dtypes.prng_key
    ):
        return key
    try:
        return jax.random.key(key)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"key must be a PRNG key or an integer seed, got {key!r}"
        ) from err


def add_noise(
    eta: ScalarOrSchedule,
    gamma: ScalarOrSchedule,
    key: ArrayLike | None = None,
    *,
    seed: int | None = None,
) -> AddNoise:
    """Add Gaussian noise of variance ``eta / t**gamma`` to the updates.

    ``key`` is a PRNG key or an integer seed; ``seed`` is optax's older name
    for an integer seed (deprecated there). Without either, the seed is 0.
    """
    if seed is not None:
        warnings.warn(
            "add_noise's seed is deprecated (as in optax): pass key instead",
            DeprecationWarning,
            stacklevel=2,
        )
        if key is not None:
            raise ValueError("add_noise takes key or seed, not both")
        key = seed
    if key is None:
        warnings.warn(
            "add_noise was given no key; using seed 0 (pass key= to choose)",
            stacklevel=2,
        )
        key = 0
    key = _as_key(key)
    if key.shape != ():
        raise ValueError(f"key must be a single PRNG key, got shape {key.shape}")
    return AddNoise(eta, gamma, jax.random.key_data(key), str(jax.random.key_impl(key)))
