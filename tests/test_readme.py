"""The README's code blocks that stand alone run as written."""

from __future__ import annotations

import pathlib
import re

import jax
import pytest

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
SECTIONS = ["## Coming from optax"]


def python_blocks(heading: str) -> list[str]:
    start = README.index(heading)
    end = README.find("\n## ", start + len(heading))
    section = README[start : end if end >= 0 else None]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize("heading", SECTIONS)
def test_section_runs(heading):
    blocks = python_blocks(heading)
    assert blocks
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):  # as users run it
        for block in blocks:
            exec(compile(block, f"README {heading}", "exec"), namespace)
