"""Every example of the documentation runs: docs/*.md, README.md, docstrings.

Each page's ```python blocks run in order, in one namespace, on the 8 simulated
CPU devices of tests/conftest.py, in a fresh working directory, under JAX's
standard dtype promotion (as users run them). A block that is deliberately not
standalone (a fragment of a multi-process script, say) is preceded by the line
``<!-- docs: not run: <why> -->``; the test checks that such a marker gives its
reason. A ```text block right after a python block shows output: it is
checked to be part of what the python blocks since the previous such text
block printed. Docstring examples written as ``>>>`` sessions run as doctests.
"""

from __future__ import annotations

import doctest
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
    try:
        with jax.numpy_dtype_promotion("standard"):
            previous = None
            for i, (kind, body, runs) in enumerate(found):
                if kind == "text" and previous == "python":  # its output
                    printed += capsys.readouterr().out
                    assert body in printed, f"{page.name}, block {i + 1}: {body}"
                    printed = ""
                elif kind == "python" and runs:
                    exec(
                        compile(body, f"{page.name}, block {i + 1}", "exec"),
                        namespace,
                    )
                previous = kind
    finally:
        jax.clear_caches()


def _reference():
    spec = importlib.util.spec_from_file_location(
        "reference_script", ROOT / "scripts" / "reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def docstring_examples() -> list[doctest.DocTest]:
    """The ``>>>`` examples in the docstrings of every public name."""
    finder = doctest.DocTestFinder(recurse=True, exclude_empty=True)
    found = []
    for entry in _reference().names():
        module_name, _, name = entry.path.rpartition(".")
        obj = getattr(sys.modules[module_name], name)
        if callable(obj):
            found += [t for t in finder.find(obj, entry.path) if t.examples]
    return found


def test_docstring_literal_blocks_are_python():
    """The ``Example::`` blocks of docstrings are fragments (they use a model,
    a loss defined elsewhere), so they do not run; they must still parse."""
    import ast
    import inspect

    reference = _reference()
    checked = 0
    for entry in reference.names():
        module_name, _, name = entry.path.rpartition(".")
        obj = getattr(sys.modules[module_name], name)
        markdown = reference._literal_blocks(inspect.getdoc(obj) or "")
        for block in re.findall(r"```python\n(.*?)```", markdown, re.S):
            try:
                ast.parse(textwrap.dedent(block))
            except SyntaxError as error:
                raise AssertionError(f"{entry.path}: {error}\n{block}") from None
            checked += 1
    assert checked >= 5  # the mechanism finds the examples there are


@pytest.mark.parametrize("example", docstring_examples(), ids=lambda t: t.name)
def test_docstring_example_runs(example):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    with jax.numpy_dtype_promotion("standard"):
        result = runner.run(example)
    assert result.failed == 0, f"{example.name}: {result.failed} examples failed"
