"""Test set-up: 8 CPU devices and strict dtype promotion, before JAX starts."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_platforms", "cpu")


def pytest_sessionstart(session):
    count = jax.device_count()
    if count != 8:
        raise RuntimeError(
            f"the tests need 8 CPU devices but JAX sees {count}: XLA_FLAGS was "
            "set after JAX started, or overridden"
        )
