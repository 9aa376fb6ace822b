"""The public names are exactly the re-exports, and the README documents each one."""

import pathlib
import re

import shardopt
import shardopt.checkpoint
import shardopt.sharding

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
DOCUMENTED = set(re.findall(r"`(?:shardopt\.)?(?:\w+\.)*?(\w+)[`(]", README))


def public(module):
    return {name for name in vars(module) if not name.startswith("_")} - {"annotations"}


def test_every_public_name_is_documented_in_the_readme():
    for module in (shardopt, shardopt.sharding, shardopt.checkpoint):
        submodules = {"checkpoint", "sharding"}
        missing = sorted(public(module) - DOCUMENTED - submodules)
        assert not missing, f"{module.__name__}: not in README.md: {missing}"


def test_init_only_reexports():
    source = pathlib.Path(shardopt.__file__).read_text()
    for line in source.splitlines()[2:]:
        if line.strip():
            assert re.fullmatch(r"from \.[\w.]+ import (\w+) as \1", line), line
