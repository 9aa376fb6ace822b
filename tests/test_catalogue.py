"""The catalogue page is the generated one, and every entry has its row."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "catalogue_script", ROOT / "scripts" / "catalogue.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


CATALOGUE = load_generator()


def test_the_catalogue_page_is_the_generated_one():
    page = CATALOGUE.PAGE.read_text()
    start = page.index(CATALOGUE.START)
    end = page.index(CATALOGUE.END) + len(CATALOGUE.END)
    assert page[start:end] == CATALOGUE.markdown(), (
        "docs/catalogue.md is stale: run PYTHONPATH=. python "
        "scripts/catalogue.py --write"
    )


def test_state_bytes_per_parameter_are_counted_from_shapes():
    import jax.numpy as jnp

    import shardopt

    # Adam keeps two float32 moments a parameter, and two int32 counts
    per = CATALOGUE.state_bytes_per_parameter(shardopt.adam(1e-3))
    total = sum(__import__("math").prod(s) for s in CATALOGUE.BYTES_TREE.values())
    assert per == (8 * total + 2 * 4) / total
    half = CATALOGUE.state_bytes_per_parameter(
        shardopt.adam(1e-3, mu_dtype=jnp.bfloat16)
    )
    assert half == (6 * total + 2 * 4) / total
    assert CATALOGUE.state_bytes_per_parameter(shardopt.constant_schedule(1.0)) is None


def test_low_precision_options_are_the_dtype_arguments():
    import shardopt

    assert CATALOGUE.low_precision(shardopt.adam) == [
        "mu_dtype",
        "nu_dtype",
        "state_bits",
    ]
    assert CATALOGUE.low_precision(shardopt.sgd) == ["accumulator_dtype", "state_bits"]
    assert CATALOGUE.low_precision(shardopt.lion) == ["mu_dtype", "state_bits"]
    assert CATALOGUE.low_precision(shardopt.adafactor) == ["dtype_momentum", "nu_dtype"]


def test_every_entry_has_a_row_or_a_named_test():
    from conformance import TESTED_ELSEWHERE

    entries = CATALOGUE.entries()
    rows = CATALOGUE.rows_by_entry(entries)
    missing = [
        e.name for e in entries if not rows[e.name] and e.name not in TESTED_ELSEWHERE
    ]
    assert not missing, f"no conformance row builds: {missing}"
    for name, where in TESTED_ELSEWHERE.items():
        assert (ROOT / where.split()[0]).exists(), (name, where)
