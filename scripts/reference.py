"""The API reference pages, generated from the package; also the site's mkdocs hook.

Every public name of every public module of shardopt (``shardopt``,
``shardopt.sharding``, ..., and any public module added later, found with
``pkgutil``) is rendered once, by mkdocstrings, on the page of the module family
it is defined in, in a section per defining module. The only hand-kept parts are
``PAGES`` (page titles and order, and which module families each page holds)
and ``SECTIONS`` (section titles and order where the module's name is not the
title wanted). A module family that no page claims gets a page of its own, named
after it, so new code is never left out of the reference.

mkdocs runs this file as a hook (``hooks:`` in mkdocs.yml): ``on_config`` adds
the reference pages to the navigation, ``on_files`` adds them (and the home
page, made from README.md) as generated files. Nothing generated is committed.

    PYTHONPATH=. python scripts/reference.py       # print the pages' Markdown

tests/test_reference.py checks that every public name appears in these pages.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pathlib
import pkgutil
import re
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import shardopt  # noqa: E402

# page file -> (title, module families it holds, first paragraph), in nav order.
# A family is a module prefix; the longest matching prefix wins.
PAGES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "optimizer": (
        "The Optimizer module",
        (
            "shardopt._optimizer",
            "shardopt._base",
            "shardopt._hyperparams",
            "shardopt._interop",
            "shardopt._jit",
        ),
        "The stateful optimizer, the transform protocol every entry follows, "
        "schedules' base class, the optax bridge and the jitted step.",
    ),
    "optimizers": (
        "Optimizers",
        ("shardopt._alias",),
        "The catalogue's constructors, by family. Each only composes "
        "transforms (a `chain`); names and arguments are optax's.",
    ),
    "transforms": (
        "Transformations",
        ("shardopt._transforms",),
        "The building blocks optimizers are chained from, by family.",
    ),
    "combinators": (
        "Combinators and wrappers",
        (
            "shardopt._transforms._combinators",
            "shardopt._transforms._partition",
            "shardopt._transforms._conditional",
            "shardopt._transforms._accumulation",
            "shardopt._transforms._lookahead",
            "shardopt._transforms._inject",
            "shardopt._transforms._finite",
            "shardopt._microbatch",
        ),
        "Transforms made of other transforms: chains, masks and partitions, "
        "conditional and accumulated steps, lookahead, injected hyperparameters.",
    ),
    "schedules": (
        "Schedules",
        ("shardopt._schedules",),
        "Schedules are Modules with their numbers as leaves: any hyperparameter "
        "takes one, and changing it never recompiles.",
    ),
    "contrib": (
        "optax.contrib",
        ("shardopt._contrib",),
        "Entries of optax.contrib, under optax's names.",
    ),
    "sharding": (
        "Sharding plans and reports",
        ("shardopt.sharding",),
        "ZeRO plans, the explicit per-device collectives, memory reports and "
        "collectives counted in compiled HLO.",
    ),
    "checkpoint": (
        "Checkpointing",
        ("shardopt.checkpoint",),
        "Orbax checkpoints that restore onto any mesh, the optax migration "
        "and the command line.",
    ),
    "distributed": (
        "Multi-host",
        ("shardopt.distributed",),
        "Joining a multi-host job, checking that processes agree, and a "
        "launcher for local processes.",
    ),
    "flax": (
        "Flax integrations",
        ("shardopt.nnx", "shardopt.linen", "shardopt.flax"),
        "shardopt optimizers in Flax NNX and linen training code.",
    ),
}
# section titles (by defining module's name, without underscores) where the
# module's own name is not the title wanted; sections not named keep it
SECTIONS: dict[str, str] = {
    "alias": "Optimizers",
    "base": "Transforms: the protocol",
    "hyperparams": "Schedules: the base class",
    "interop": "optax inside shardopt",
    "optimizer": "Optimizer",
    "sgd": "SGD",
    "rms": "RMS and Adagrad",
    "adam": "Adam",
    "dog": "DoG",
    "sm3": "SM3",
    "lbfgs": "L-BFGS",
    "hlo": "Collectives in compiled HLO",
    "plan": "Plans",
    "memory": "Memory reports",
    "grad": "The gradient path",
    "specs": "Leaf layouts",
    "state": "State layouts",
    "cli": "Command line",
    "multihost": "Start-up and agreement",
    "launch": "Local processes",
    "nnx": "Flax NNX",
    "linen": "Flax linen",
}
# sections shown first on a page, in this order (the others follow by name)
FIRST = (
    "optimizer",
    "sgd",
    "adam",
    "basic",
    "combinators",
    "partition",
    "plan",
    "manager",
    "multihost",
)


@dataclasses.dataclass(frozen=True)
class Name:
    """One public object: where users reach it, and where it is defined."""

    path: str  # the path it is rendered under, e.g. "shardopt.zero"
    also: tuple[str, ...]  # the other public paths of the same object
    module: str  # its defining module, e.g. "shardopt.sharding._plan"
    line: int  # where in that module (names are shown in source order)


def public_modules() -> list[types.ModuleType]:
    """shardopt and every public module under it (a public name at each level)."""
    found = [shardopt]
    for info in pkgutil.walk_packages(shardopt.__path__, "shardopt."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(importlib.import_module(info.name))
    return found


def public_names(module: types.ModuleType) -> list[str]:
    """The names a user imports from ``module`` (not its submodules): its
    ``__all__`` if it has one, else every public name except modules and what
    it imported from outside shardopt (``Any``, ``jax.Array``, ...)."""
    if hasattr(module, "__all__"):
        return sorted(module.__all__)

    def own(value: object) -> bool:
        home = getattr(value, "__module__", None)
        return not isinstance(home, str) or home.startswith("shardopt")

    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and name != "annotations"
        and not isinstance(value, types.ModuleType)
        and own(value)
    )


def _defining_module(module: types.ModuleType, name: str, value: object) -> str:
    home = getattr(value, "__module__", None)
    if isinstance(home, str) and home.startswith("shardopt"):
        return home
    # constants (BUCKET_BYTES) and the like: read the re-export line
    source = inspect.getsource(module)
    found = re.search(rf"from (\.[\w.]*) import {name} as {name}\b", source)
    if found is None:
        return module.__name__
    return importlib.util.resolve_name(found.group(1), module.__package__)


def names() -> list[Name]:
    """Every public object once: at its shortest public path, and its aliases."""
    by_object: dict[tuple[int, str], list[tuple[str, str]]] = {}
    lines: dict[tuple[int, str], int] = {}
    for module in public_modules():
        for name in public_names(module):
            value = getattr(module, name)
            home = _defining_module(module, name, value)
            # constants are not unique objects: key them by where they live
            key = (id(value), name) if callable(value) else (0, f"{home}.{name}")
            by_object.setdefault(key, []).append((f"{module.__name__}.{name}", home))
            lines.setdefault(key, _line(value))
    out = []
    for key, paths in by_object.items():
        ordered = sorted(p for p, _ in paths)
        ordered.sort(key=lambda p: p.count("."))
        out.append(Name(ordered[0], tuple(ordered[1:]), paths[0][1], lines[key]))
    return sorted(out, key=lambda n: (n.module, n.line, n.path))


def _line(value: object) -> int:
    try:
        return inspect.getsourcelines(value)[1]
    except (TypeError, OSError):
        return 0


def _stem(module: str) -> str:
    return module.rsplit(".", 1)[-1].strip("_")


def page_of(module: str) -> str:
    """The page a defining module's names go on: the longest claiming family,
    or else a page named for the module's family (its first component under
    shardopt), so that a new family is never left out."""
    best, length = None, -1
    for page, (_, families, _) in PAGES.items():
        for family in families:
            if (module == family or module.startswith(family + ".")) and len(
                family
            ) > length:
                best, length = page, len(family)
    if best is not None:
        return best
    parts = module.split(".")
    return parts[1].strip("_") if len(parts) > 1 else "shardopt"


def _row_sources() -> dict[str, str]:
    """Each conformance row's ``ours``, as written in its ``Row(...)`` call, with
    a comment giving each helper it names (a constant's value, a function's
    docstring line) from the module that defines the row."""
    import ast

    found = {}
    for path in sorted((ROOT / "tests").glob("*.py")):
        text = path.read_text()
        if "Row(" not in text:
            continue
        module = None
        for node in ast.walk(ast.parse(text)):
            if not (
                isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Row"
            ):
                continue
            args = list(node.args) + [k.value for k in node.keywords if k.arg == "ours"]
            if not (len(args) >= 2 and isinstance(args[0], ast.Constant)):
                continue
            if not isinstance(args[1], ast.Lambda):
                continue
            body = args[1].body
            lines = [ast.unparse(body)]
            module = module or importlib.import_module(path.stem)
            helpers = sorted(
                {n.id for n in ast.walk(body) if isinstance(n, ast.Name)}
                - {"shardopt", "optax", "jax", "jnp", "np"}
            )
            for helper in helpers:
                value = getattr(module, helper, None)
                if isinstance(value, int | float):
                    lines.append(f"# {helper} = {value!r}")
                elif callable(value) and inspect.getdoc(value):
                    lines.append(f"# {helper}: {inspect.getdoc(value).splitlines()[0]}")
            found[args[0].value] = "\n".join(lines)
    return found


@functools.cache
def examples() -> dict[str, tuple[str, str]]:
    """For each catalogue entry, the shortest conformance row that builds it:
    ``{name: (row, its construction as written)}``. These run in the
    conformance tests, against optax, every test run."""
    import importlib.util as util

    spec = util.spec_from_file_location(
        "catalogue_script", ROOT / "scripts" / "catalogue.py"
    )
    catalogue = util.module_from_spec(spec)
    sys.modules[spec.name] = catalogue
    spec.loader.exec_module(catalogue)
    sources = _row_sources()
    out = {}
    for name, rows in catalogue.rows_by_entry(catalogue.entries()).items():
        written = [
            (len(sources[r].split("\n")[0]), r)
            for r in rows
            if f"shardopt.{name}(" in sources.get(r, "")  # it shows the entry
        ]
        if written:
            row = min(written)[1]
            out[name] = (row, sources[row])
    return out


@functools.cache
def pages() -> dict[str, tuple[str, str]]:
    """page file stem -> (title, Markdown), in navigation order."""
    grouped: dict[str, dict[str, list[Name]]] = {}
    for entry in names():
        sections = grouped.setdefault(page_of(entry.module), {})
        sections.setdefault(_stem(entry.module), []).append(entry)
    order = [p for p in PAGES if p in grouped] + sorted(set(grouped) - set(PAGES))
    tested = examples()
    out = {}
    for page in order:
        if page in PAGES:
            title, _, intro = PAGES[page]
        else:  # a family no page claims yet: its module's docstring says what
            title = page.replace("_", " ").capitalize()
            module = (
                importlib.import_module(f"shardopt.{page}")
                if _is_module(f"shardopt.{page}")
                else None
            )
            intro = (inspect.getdoc(module) or "").split("\n")[0] if module else ""
        lines = [f"# {title}", "", intro, ""]
        sections = grouped[page]
        first = [s for s in FIRST if s in sections]
        for stem in first + sorted(set(sections) - set(first)):
            lines += [
                f"## {SECTIONS.get(stem, stem.replace('_', ' ').capitalize())}",
                "",
            ]
            for entry in sections[stem]:
                lines.append(f"::: {entry.path}")
                name = entry.path.removeprefix("shardopt.")
                if name in tested:
                    row, source = tested[name]
                    lines += [
                        "",
                        f"Example (the conformance row `{row}`, run against optax "
                        "by every test run):",
                        "",
                        "```python",
                        source,
                        "```",
                    ]
                if entry.also:
                    also = ", ".join(f"`{p}`" for p in entry.also)
                    lines += ["", f"Also importable as {also}."]
                lines.append("")
        out[page] = (title, "\n".join(lines))
    return out


def _is_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def home_page() -> str:
    """README.md as the site's home page: links into docs/ made site-relative."""
    text = (ROOT / "README.md").read_text()
    # its comparison table is wide: the page hides the side bars
    return "---\nhide:\n  - navigation\n  - toc\n---\n\n" + re.sub(
        r"\]\(docs/", "](", text
    )


# ---- mkdocs hook -------------------------------------------------------------

REFERENCE_DIR = "reference"


def on_config(config, **kwargs):
    """Put the generated reference pages under the "API reference" nav entry."""
    entries = [
        {title: f"{REFERENCE_DIR}/{page}.md"} for page, (title, _) in pages().items()
    ]
    for item in config["nav"]:
        if isinstance(item, dict) and "API reference" in item:
            item["API reference"] = entries
            break
    else:
        config["nav"].append({"API reference": entries})
    return config


_CODE_PATH = re.compile(r"(?<![\[`])(?<!`` )`(shardopt(?:\.\w+)+)(\([^`]*\))?`(?!\])")


def link_code(markdown: str, targets: dict[str, str]) -> str:
    """In a guide, inline code naming a public object (``shardopt.zero(...)``)
    becomes a link to its reference; code blocks and headings stay as they are."""

    def one(match: re.Match) -> str:
        path = match.group(1)
        target = targets.get(path)
        if target is None or not path.count("."):
            return match.group(0)
        return f"[{match.group(0)}][{target}]"

    parts = re.split(r"(^```.*?^```)", markdown, flags=re.S | re.M)
    for i in range(0, len(parts), 2):  # the even parts are outside fences
        parts[i] = "\n".join(
            line if line.startswith("#") else _CODE_PATH.sub(one, line)
            for line in parts[i].split("\n")
        )
    return "".join(parts)


def on_page_markdown(markdown, page, config, files, **kwargs):
    if page.file.src_uri.startswith(REFERENCE_DIR + "/"):
        return markdown
    return link_code(markdown, {k: v for k, v in _targets().items() if "." in k})


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    for page, (_, text) in pages().items():
        files.append(File.generated(config, f"{REFERENCE_DIR}/{page}.md", content=text))
    files.append(File.generated(config, "index.md", content=home_page()))
    return files


if __name__ == "__main__":
    for page, (title, text) in pages().items():
        print(f"<!-- {REFERENCE_DIR}/{page}.md: {title} -->\n{text}")


# ---- griffe extension: Sphinx roles in docstrings become links ----------------

try:
    import griffe
except ImportError:  # the docs extra is not installed: only the generator is used
    griffe = None

_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj|exc):`~?([\w.]+)`")


@functools.cache
def _targets() -> dict[str, str]:
    """Each rendered path, and each short form of it, -> the rendered path."""
    out: dict[str, str] = {}
    for entry in names():
        for path in (entry.path, *entry.also):
            out.setdefault(path, entry.path)
            out.setdefault(path.rsplit(".", 1)[-1], entry.path)
    return out


def link_roles(text: str, targets: dict[str, str]) -> str:
    """``:func:`~shardopt.chain``` -> a link to the reference's ``shardopt.chain``;
    a name the reference does not render stays code."""

    def one(match: re.Match) -> str:
        name = match.group(1)
        head, _, member = name.partition(".")
        if name in targets:
            target = targets[name]
        elif head in targets and member and not name.startswith("shardopt"):
            target = f"{targets[head]}.{member}"  # a method: Class.method
        else:
            return f"`{name}`"
        return f"[`{name.rsplit('.', 1)[-1]}`][{target}]"

    return _ROLE.sub(one, text)


_BORDER = re.compile(r"^( *)=+( +=+)+ *$")


def _simple_tables(text: str) -> str:
    """reStructuredText simple tables (``===  ===`` borders) -> Markdown tables."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        border = _BORDER.match(lines[i])
        ends = [j for j in range(i + 1, len(lines)) if lines[j] == lines[i]]
        if not border or len(ends) < 2:
            out.append(lines[i])
            i += 1
            continue
        spans = [m.span() for m in re.finditer(r"=+", lines[i])]

        def cells(line, spans=spans):
            starts = [a for a, _ in spans] + [len(line) + 1]
            return [line[a : starts[k + 1]].strip() for k, a in enumerate(starts[:-1])]

        header = cells(lines[i + 1])
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += [
            "| " + " | ".join(cells(row)) + " |" for row in lines[ends[0] + 1 : ends[1]]
        ]
        i = ends[1] + 1
    return "\n".join(out)


def _literal_blocks(text: str) -> str:
    """A paragraph ending in ``::`` and the indented block after it: a fenced
    Python block (reStructuredText's literal block)."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        if not (line.rstrip().endswith("::") and i + 1 < len(lines)):
            out.append(line)
            i += 1
            continue
        out.append(line.rstrip()[:-1])  # "Example::" -> "Example:"
        indent = len(line) - len(line.lstrip())
        j, block = i + 1, []
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
        ):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        while block and not block[0].strip():
            block.pop(0)
        body = [b for b in block if b.strip()]
        cut = min(len(b) - len(b.lstrip()) for b in body) if body else 0
        out += ["", " " * indent + "```python"]
        out += [" " * indent + b[cut:] if b.strip() else "" for b in block]
        out += [" " * indent + "```", ""]
        i = j
    return "\n".join(out)


def markdown_from_rst(text: str, targets: dict[str, str]) -> str:
    """The reStructuredText the docstrings use, as Markdown for mkdocstrings."""
    return _literal_blocks(_simple_tables(link_roles(text, targets)))


if griffe is not None:

    class RstRoles(griffe.Extension):
        """Rewrite Sphinx cross-reference roles into mkdocs-autorefs links."""

        def __init__(self) -> None:
            super().__init__()
            self.targets = _targets()

        def on_instance(self, *, obj, **kwargs) -> None:
            if obj.docstring is not None:
                obj.docstring.value = markdown_from_rst(
                    obj.docstring.value, self.targets
                )
