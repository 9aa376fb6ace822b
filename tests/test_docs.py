"""Every example of the documentation runs: docs/*.md, README.md, docstrings.

Each page's ```python blocks run in order, in one namespace, on the 8 simulated
CPU devices of tests/conftest.py, in a fresh working directory, under JAX's
standard dtype promotion (as users run them). A block that is deliberately not
standalone (a fragment of a multi-process script, say) is preceded by the line
``<!-- docs: not run: <why> -->``; the test checks that such a marker gives its
reason. A ```text block right after a python block shows output: it is
checked to be part of what the python blocks since the previous such text
block printed. The literal blocks (``Example::``) of the docstrings run too,
each on its own with the imports of ``PRELUDE``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys
import textwrap
import types

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"(<!-- docs: not run[^>]*-->\n)?```(\w*)\n(.*?)```", re.S)
NOT_RUN = re.compile(r"<!-- docs: not run: \S.*-->")


def blocks(page: pathlib.Path) -> list[tuple[str, str, bool]]:
    """The page's fenced blocks: (language, body, whether it runs)."""
    return [
        (kind, body, not marker)
        for marker, kind, body in FENCE.findall(page.read_text())
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_runs(page, tmp_path, monkeypatch, capsys):
    found = blocks(page)
    for marker in re.findall(r"<!-- docs: not run[^>]*-->", page.read_text()):
        assert NOT_RUN.fullmatch(marker), f"{page.name}: say why: {marker}"
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    # the page runs as a module of its own, so that the classes it defines
    # (dataclasses, Equinox modules) can find their module
    module = types.ModuleType("__docs__")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = vars(module)
    printed = ""
    with jax.numpy_dtype_promotion("standard"):
        previous = None
        for i, (kind, body, runs) in enumerate(found):
            if kind == "text" and previous == "python":  # its output
                printed += capsys.readouterr().out
                assert body in printed, f"{page.name}, block {i + 1}: {body}"
                printed = ""
            elif kind == "python" and runs:
                exec(compile(body, f"{page.name}, block {i + 1}", "exec"), namespace)
            previous = kind


def _reference():
    spec = importlib.util.spec_from_file_location(
        "reference_script", ROOT / "scripts" / "reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# what a docstring example may use without importing it
PRELUDE = """\
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import shardopt
"""


def docstring_examples() -> list[tuple[str, str]]:
    """(public name, code) of the literal blocks (``Example::``) of every public
    name's docstring, as the reference shows them."""
    import inspect

    reference = _reference()
    found = []
    for entry in reference.names():
        module_name, _, name = entry.path.rpartition(".")
        obj = getattr(sys.modules[module_name], name)
        markdown = reference._literal_blocks(inspect.getdoc(obj) or "")
        for block in re.findall(r"```python\n(.*?)```", markdown, re.S):
            found.append((entry.path, textwrap.dedent(block)))
    return found


EXAMPLES = docstring_examples()


def test_the_docstring_examples_are_found():
    assert len(EXAMPLES) >= 9, [path for path, _ in EXAMPLES]


@pytest.mark.parametrize(("path", "code"), EXAMPLES, ids=[p for p, _ in EXAMPLES])
def test_docstring_example_runs(path, code, tmp_path, monkeypatch):
    """Each runs alone (with PRELUDE's imports), in a fresh directory; one that
    cannot stand alone starts with ``# not run: <why>`` and must still parse."""
    if code.startswith("# not run: "):
        compile(code, path, "exec")
        return
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("__docs__")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with jax.numpy_dtype_promotion("standard"):
        exec(compile(PRELUDE + code, path, "exec"), vars(module))
