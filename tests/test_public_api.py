"""The public names are exactly the re-exports, and the README documents each one."""

import ast
import pathlib
import re

import pytest

import shardopt
import shardopt.checkpoint
import shardopt.distributed
import shardopt.linen
import shardopt.nnx
import shardopt.sharding

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
DOCUMENTED = set(re.findall(r"`(?:shardopt\.)?(?:\w+\.)*?(\w+)[`(]", README))


def public(module):
    return {name for name in vars(module) if not name.startswith("_")} - {"annotations"}


def test_every_public_name_is_documented_in_the_readme():
    modules = (
        shardopt,
        shardopt.sharding,
        shardopt.checkpoint,
        shardopt.distributed,
        shardopt.nnx,
        shardopt.linen,
    )
    for module in modules:
        submodules = {"checkpoint", "sharding", "distributed", "integrations"}
        submodules |= {"nnx", "linen"}
        missing = sorted(public(module) - DOCUMENTED - submodules)
        assert not missing, f"{module.__name__}: not in README.md: {missing}"


@pytest.mark.parametrize(
    "module",
    [
        shardopt,
        shardopt.sharding,
        shardopt.checkpoint,
        shardopt.distributed,
        shardopt.nnx,
        shardopt.linen,
    ],
    ids=lambda m: m.__name__,
)
def test_init_only_reexports(module):
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    docstring, *body = tree.body
    assert isinstance(docstring, ast.Expr), "an __init__ starts with its docstring"
    for node in body:
        assert isinstance(node, ast.ImportFrom) and node.level >= 1, ast.unparse(node)
        for alias in node.names:
            # one explicit re-export a name: `from ._x import name as name`
            assert alias.asname == alias.name, ast.unparse(node)
