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


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadgroup``), keep each conformance row's tests
    on one worker: they share that row's cached runs and compiled steps."""
    import pytest

    for item in items:
        callspec = getattr(item, "callspec", None)
        if item.module.__name__ == "test_conformance" and callspec is not None:
            name = callspec.params.get("name")
            if name is not None:
                item.add_marker(pytest.mark.xdist_group(name))


def pytest_runtest_teardown(item, nextitem):
    """Free JAX's compiled executables whenever the next test shares none of them.

    Every executable XLA:CPU loads keeps memory maps; a worker that holds those
    of the whole suite (over a thousand steps compiled) passes the kernel's
    limit of 65530 maps, and the next compilation dies with a segfault. Tests
    of one module share their compilations, and in the conformance table only
    the tests of one row do.
    """
    if nextitem is None or _sharing(nextitem) != _sharing(item):
        jax.clear_caches()


def _sharing(item):
    callspec = getattr(item, "callspec", None)
    row = None
    if item.module.__name__ == "test_conformance" and callspec is not None:
        row = callspec.params.get("name")
    return item.module.__name__, row
