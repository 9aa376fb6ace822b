"""The README's catalogue is the generated one, and every entry has its row."""

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


def test_readme_holds_the_generated_catalogue():
    readme = (ROOT / "README.md").read_text()
    start = readme.index(CATALOGUE.START)
    end = readme.index(CATALOGUE.END) + len(CATALOGUE.END)
    assert readme[start:end] == CATALOGUE.markdown(), (
        "README.md's catalogue is stale: run PYTHONPATH=. python "
        "scripts/catalogue.py --write"
    )


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
