"""Every public name is in the API reference, which is generated from the package.

scripts/reference.py writes the reference pages (mkdocs runs it as a hook);
``scripts/docs`` builds them with ``mkdocs build --strict``, which fails on a
name mkdocstrings cannot find and on a broken cross-reference.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_reference():
    spec = importlib.util.spec_from_file_location(
        "reference_script", ROOT / "scripts" / "reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


REFERENCE = load_reference()


def rendered() -> tuple[set[str], set[str]]:
    """The paths rendered by mkdocstrings, and those named as their aliases."""
    text = "\n".join(page for _, page in REFERENCE.pages().values())
    shown = set(re.findall(r"^::: (\S+)$", text, re.M))
    aliases = set(
        re.findall(
            r"`([\w.]+)`", " ".join(re.findall(r"Also importable as (.*)", text))
        )
    )
    return shown, aliases


def test_every_public_name_is_in_the_reference():
    shown, aliases = rendered()
    missing = []
    for module in REFERENCE.public_modules():
        for name in REFERENCE.public_names(module):
            path = f"{module.__name__}.{name}"
            if path not in shown and path not in aliases:
                missing.append(path)
    assert not missing, f"not in the API reference: {missing}"


def test_each_object_is_rendered_once():
    text = "\n".join(page for _, page in REFERENCE.pages().values())
    paths = re.findall(r"^::: (\S+)$", text, re.M)
    assert len(paths) == len(set(paths))
    assert len(paths) == len(REFERENCE.names())


def test_a_new_module_family_gets_a_page_without_a_table_entry():
    # a family no page claims: named after its first component under shardopt
    assert REFERENCE.page_of("shardopt._experimental._thing") == "experimental"
    assert REFERENCE.page_of("shardopt.orbit") == "orbit"
    # the families other branches add have their titles ready
    assert REFERENCE.page_of("shardopt.nnx") == "flax"
    assert REFERENCE.page_of("shardopt._contrib._muon") == "contrib"
    # the longest claiming family wins: chain is a combinator, not a transform
    assert REFERENCE.page_of("shardopt._transforms._combinators") == "combinators"
    assert REFERENCE.page_of("shardopt._transforms._moments") == "transforms"


def test_sphinx_roles_become_links_only_to_rendered_names():
    targets = REFERENCE._targets()
    text = (
        "see :func:`~shardopt.chain`, :meth:`ShardingPlan.value_and_grad` "
        "and :class:`jax.Array`"
    )
    assert REFERENCE.link_roles(text, targets) == (
        "see [`chain`][shardopt.chain], "
        "[`value_and_grad`][shardopt.ShardingPlan.value_and_grad] and `jax.Array`"
    )


def test_the_home_page_is_the_readme_with_site_links():
    home = REFERENCE.home_page()
    assert "](docs/" not in home
    assert "](catalogue.md)" in home


def test_rst_tables_and_literal_blocks_become_markdown():
    text = "\n".join(
        [
            "Rules:",
            "",
            "=====  =====",
            "stage  state",
            "=====  =====",
            "0      L",
            "1      Z",
            "=====  =====",
            "",
            "Example::",
            "",
            "    plan = shardopt.zero(1, mesh)",
            "    if plan:",
            "        pass",
            "",
            "After.",
        ]
    )
    assert REFERENCE.markdown_from_rst(text, {}) == "\n".join(
        [
            "Rules:",
            "",
            "| stage | state |",
            "|---|---|",
            "| 0 | L |",
            "| 1 | Z |",
            "",
            "Example:",
            "",
            "```python",
            "plan = shardopt.zero(1, mesh)",
            "if plan:",
            "    pass",
            "```",
            "",
            "After.",
        ]
    )


def test_guides_link_inline_code_that_names_a_public_object():
    targets = {k: v for k, v in REFERENCE._targets().items() if "." in k}
    text = "\n".join(
        [
            "# About `shardopt.zero`",
            "Use `shardopt.zero(1, mesh)` or `shardopt.sharding.FactoredState`,",
            "not `shardopt.nothing`; [`shardopt.zero`](zero.md) is a link already.",
            "Inside code: `` `shardopt.zero` ``.",
            "```python",
            "`shardopt.zero`",
            "```",
        ]
    )
    assert REFERENCE.link_code(text, targets) == "\n".join(
        [
            "# About `shardopt.zero`",
            "Use [`shardopt.zero(1, mesh)`][shardopt.zero] or "
            "[`shardopt.sharding.FactoredState`][shardopt.FactoredState],",
            "not `shardopt.nothing`; [`shardopt.zero`](zero.md) is a link already.",
            "Inside code: `` `shardopt.zero` ``.",
            "```python",
            "`shardopt.zero`",
            "```",
        ]
    )
