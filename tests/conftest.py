"""Test set-up: 8 CPU devices and strict dtype promotion, before JAX starts."""

import atexit
import os
import pathlib
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import pytest

CONFORMANCE = "test_conformance"  # the table's module: its rows share their runs

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_platforms", "cpu")
# XLA's HLO passes (fusion, SPMD partitioning, collective combining) all still
# run; only LLVM's code generation is left unoptimised. The suite's programs
# are tiny, so compiling, not running, is what it spends its time on.
jax.config.update("jax_disable_most_optimizations", True)


def _share_compilations() -> None:
    """One compilation per distinct program for the whole run.

    JAX's in-memory caches are keyed on the jitted function, and the tests
    build many functions that compile to the same program (each test its own
    ``jax.jit`` of the same step). JAX's persistent cache is keyed on the
    program itself: with it, a program one test compiled is loaded by every
    later one. The directory lives for one run: made by the first process
    (the pytest-xdist controller, whose environment the workers inherit) and
    removed when it exits; each worker has a folder of its own in it (JAX
    writes an entry in place, so a worker could read another's half-written
    entry). Set ``SHARDOPT_TEST_XLA_CACHE=off`` to compile everything afresh.
    """
    directory = os.environ.get("SHARDOPT_TEST_XLA_CACHE")
    if directory == "off":
        return
    if not directory:
        directory = tempfile.mkdtemp(prefix="shardopt-xla-cache-")
        os.environ["SHARDOPT_TEST_XLA_CACHE"] = directory
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    jax.config.update("jax_compilation_cache_dir", os.path.join(directory, worker))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_share_compilations()


def pytest_sessionstart(session):
    count = jax.device_count()
    if count != 8:
        raise RuntimeError(
            f"the tests need 8 CPU devices but JAX sees {count}: XLA_FLAGS was "
            "set after JAX started, or overridden"
        )


def pytest_collection_modifyitems(config, items):
    """Each conformance row's tests one after another, the table last.

    A row's tests share its cached runs and compiled steps, so JAX's caches
    are cleared (when over budget) only between rows; the sort is stable, so
    the columns keep their order. Under pytest-xdist the rows, small units of
    work, are then what the workers take last (see ``_Scheduling``).
    """
    rows = {}  # row name -> its position in the table (first seen)
    for item in items:
        rows.setdefault(_sharing(item)[1], len(rows))
    items.sort(
        key=lambda item: (item.module.__name__ == CONFORMANCE, rows[_sharing(item)[1]])
    )


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``-n N --dist loadscope`` (scripts/test), a worker takes a whole
    module or a whole conformance row at a time (``_Scheduling``)."""
    if config.getvalue("dist") == "loadscope":
        return _scheduling()(config, log)
    return None


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its conformance row (the stage cut
    from ``test_zero_stages_match_unsharded``'s id), else its module."""
    module, _, test = nodeid.partition("::")
    if pathlib.PurePath(module).stem != CONFORMANCE or "[" not in test:
        return module
    function, _, param = test.partition("[")
    param = param.removesuffix("]")
    if function == "test_zero_stages_match_unsharded":
        param = param.rsplit("-", 1)[0]  # the row, without the stage
    return f"{module}::{param}"


def _scheduling():
    from xdist.scheduler import LoadScopeScheduling

    class _Scheduling(LoadScopeScheduling):
        """Units of work that share their compiled programs (``work_unit``): a
        module's tests, a conformance row's tests (a whole module would keep
        one worker busy for minutes while the other waits). Units go out in
        collection order, the table last, with ``--no-loadscope-reorder``.

        The unit is read from the node id, not from ``xdist_group`` marks:
        with pytest 9.2 xdist no longer sees marks added during collection
        (pytest-xdist#1386), and every row's tests were spread over both
        workers, each compiling the row's four ZeRO stages.
        """

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return _Scheduling


def pytest_runtest_teardown(item, nextitem):
    """Free JAX's compiled executables once they are many, at a point where
    the next test shares none of them.

    Every executable XLA:CPU loads keeps memory maps (about six) and memory; a
    worker that holds those of the whole suite (thousands of programs) passes
    the kernel's limit of memory maps (``vm.max_map_count``, 65530 by default),
    and the next compilation dies with a segfault. Clearing only past a budget
    of maps, not after every module or row, keeps what the tests share across
    them: the small programs of eager operations and of common set-up, the
    steps of identical rows. Tests of one module share their compilations, and
    in the conformance table only the tests of one row do, so the caches are
    cleared between those.
    """
    if nextitem is None or _sharing(nextitem) == _sharing(item):
        return
    maps = _memory_maps()
    if maps is None or maps > _MAP_BUDGET:
        jax.clear_caches()


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return 65530


# 8192 maps: about 1300 executables, a worker of about 1 GB resident (measured
# on the conformance table: some 100 kB per map); far below the kernel's
# limit, which one module or row never comes near
_MAP_BUDGET = min(8192, _max_map_count() // 4)


def _memory_maps() -> int | None:
    """How many memory maps this process holds (None where /proc is absent:
    there the caches are cleared at every boundary, as a safe default)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


def _sharing(item):
    callspec = getattr(item, "callspec", None)
    row = None
    if item.module.__name__ == CONFORMANCE and callspec is not None:
        row = callspec.params.get("name")
    return item.module.__name__, row
