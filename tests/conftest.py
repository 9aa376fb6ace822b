"""Test set-up: 8 CPU devices and strict dtype promotion, before JAX starts."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_platforms", "cpu")
# XLA's HLO passes (fusion, SPMD partitioning, collective combining) all still
# run; only LLVM's code generation is left unoptimised. The suite's programs
# are tiny, so compiling, not running, is what it spends its time on.
jax.config.update("jax_disable_most_optimizations", True)


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

    rows = {}  # row name -> its position in the table (first seen)
    for item in items:
        row = _sharing(item)[1]
        if row is not None:
            item.add_marker(pytest.mark.xdist_group(row))
            rows.setdefault(row, len(rows))
    # each row's tests one after another (stable: columns keep their order), so
    # the caches are cleared once per row, not between every two tests
    row_of = lambda item: rows.get(_sharing(item)[1], -1)
    items.sort(
        key=lambda item: (item.module.__name__ == "test_conformance", row_of(item))
    )


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
