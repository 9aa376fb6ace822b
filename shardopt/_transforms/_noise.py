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
        return AddNoiseState(zero_count(), jnp.copy(self.key_data))

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


def resolve_key(key: ArrayLike | None, seed: int | None, owner: str) -> Array:
    """The typed PRNG key of ``owner(..., key=, seed=)``, as optax takes it: a
    typed or raw (uint32) key or an int seed in ``key``, or the deprecated int
    ``seed``; neither means seed 0, with a warning."""
    if seed is not None:
        warnings.warn(
            f"{owner}'s seed is deprecated (as in optax): pass key instead",
            DeprecationWarning,
            stacklevel=3,
        )
        if key is not None:
            raise ValueError(f"{owner} takes key or seed, not both")
        key = seed
    if key is None:
        warnings.warn(
            f"{owner} was given no key; using seed 0 (pass key= to choose)",
            stacklevel=3,
        )
        key = 0
    if not (
        isinstance(key, jax.Array)
        and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    ):
        try:
            if isinstance(key, (int, jnp.integer)) and not isinstance(key, bool):
                key = jax.random.key(key)
            else:  # a raw (uint32) key, as jax.random.PRNGKey makes
                key = jax.random.wrap_key_data(jnp.asarray(key))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"key must be a PRNG key or an integer seed, got {key!r}"
            ) from err
    if key.shape != ():
        raise ValueError(f"key must be a single PRNG key, got shape {key.shape}")
    return key


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
    key = resolve_key(key, seed, "add_noise")
    return AddNoise(eta, gamma, jax.random.key_data(key), str(jax.random.key_impl(key)))
