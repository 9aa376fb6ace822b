"""The public names are exactly the re-exports: one explicit line a name.

That every public name is documented is checked in tests/test_reference.py
(the API reference generated from the package).
"""

import ast
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _reference():
    spec = importlib.util.spec_from_file_location(
        "reference_script", ROOT / "scripts" / "reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


MODULES = _reference().public_modules()


def test_the_known_public_modules_are_found():
    names = {module.__name__ for module in MODULES}
    expected = {"shardopt", "shardopt.sharding", "shardopt.checkpoint"}
    expected |= {"shardopt.nnx", "shardopt.linen"}
    assert expected | {"shardopt.distributed"} <= names, names


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_init_only_reexports(module):
    if not module.__file__.endswith("__init__.py"):
        pytest.skip("a public module file (not a package): its own code is its API")
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    docstring, *body = tree.body
    assert isinstance(docstring, ast.Expr), "an __init__ starts with its docstring"
    for node in body:
        assert isinstance(node, ast.ImportFrom) and node.level >= 1, ast.unparse(node)
        for alias in node.names:
            # one explicit re-export a name: `from ._x import name as name`
            assert alias.asname == alias.name, ast.unparse(node)
