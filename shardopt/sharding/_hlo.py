"""The collectives in compiled HLO: what XLA really emitted for a step."""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_COLLECTIVE = re.compile(
    r"=\s*(\([^=]*?\)|\S+)\s+"
    r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
_COMMENT = re.compile(r"/\*.*?\*/")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op in compiled HLO: its kind and result shapes."""

    kind: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in ``compiled.as_text()`` (async pairs counted once)."""
    found = []
    # XLA writes /*index=5*/ inside long tuple shapes (combined collectives):
    # drop comments first so their "=" cannot hide an op.
    hlo_text = _COMMENT.sub("", hlo_text)
    for shapes, kind in _COLLECTIVE.findall(hlo_text):
        parsed = tuple(
            tuple(int(n) for n in dims.split(",") if n)
            for _, dims in _SHAPE.findall(shapes)
        )
        if kind == "all-gather" and shapes.startswith("("):
            # all-gather-start returns (operand, result): keep the result.
            parsed = parsed[len(parsed) // 2 :]
        found.append(Collective(kind, parsed))
    return found


def count_collectives(hlo_text: str) -> dict[str, int]:
    """``{kind: count}`` of the collectives in compiled HLO text."""
    return dict(collections.Counter(c.kind for c in collectives(hlo_text)))


def compiled_text(fn, *args, **kwargs) -> str:
    """The optimised HLO of ``fn(*args)`` (``fn`` a jit or filter_jit function)."""
    lowered = fn.lower(*args, **kwargs)
    compiled = lowered.compile()
    compiled = getattr(compiled, "compiled", compiled)  # eqx.filter_jit wraps it
    return compiled.as_text()
