"""The package's shape: layers that import one way, modules readable in one sitting,
and every third-party import declared in pyproject.toml."""

from __future__ import annotations

import ast
import pathlib
import re
import sys

import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "shardopt"
MAX_LINES = 600

# Lower layers never import higher ones (DESIGN: transforms <- sharding <-
# Optimizer <- checkpoint, integrations). Modules not listed are the package's
# re-export points (__init__.py).
LAYERS = {
    "core": 0,  # _base, _tree, _tree_math, _explicit, _hyperparams, _interop, ...
    "transforms": 1,  # _transforms, _schedules, _alias
    "sharding": 2,
    "optimizer": 3,
    "checkpoint": 4,
    "distributed": 4,
    "integrations": 5,  # _integrations/, and nnx.py / linen.py re-exporting them
}
# import name -> distribution name in pyproject's dependencies
DISTRIBUTIONS = {
    "jax": "jax",
    "equinox": "equinox",
    "flax": "flax",
    "jaxtyping": "jaxtyping",
    "numpy": "numpy",
    "orbax": "orbax-checkpoint",
    "rich": "rich",
    "tensorstore": "tensorstore",
    "xxhash": "xxhash",
}
# the same for what only examples/ imports (the ``examples`` extra)
EXAMPLE_DISTRIBUTIONS = {
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "sklearn": "scikit-learn",
}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) == 1 or parts[-1] == "__init__":
        return None
    top = parts[1]
    if top in {
        "_base",
        "_tree",
        "_tree_math",
        "_explicit",
        "_hyperparams",
        "_interop",
        "_microbatch",
        "_debug",
        "_jit",
        "_flat",
    }:
        return "core"
    if top in {"_transforms", "_schedules", "_alias"}:
        return "transforms" if len(parts) > 2 else None
    if top == "_optimizer":
        return "optimizer"
    if top in {"nnx", "linen"}:
        return "integrations"
    if top == "_integrations":
        return "integrations" if len(parts) > 2 else None
    if top in {"sharding", "checkpoint", "distributed"}:
        return top if len(parts) > 2 else None
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(module: str, path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(shardopt modules, third-party top-level names) that ``module`` imports."""
    tree = ast.parse(path.read_text())
    parents = {
        child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)
    }
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    known = modules()
    inside, outside = set(), set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            # an imported submodule is an edge to it; an imported name, to stem
            names = [
                f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "shardopt":
                if name in known:
                    inside.add(name)
            else:
                outside.add(name.split(".")[0])
    return inside - {module}, outside


def test_no_module_is_over_600_lines():
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_no_import_cycle():
    graph = {name: imports(name, path)[0] for name, path in modules().items()}
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = [*trail[trail.index(nxt) :], nxt] if nxt in trail else [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_layers_import_downwards_only():
    wrong = []
    for name, path in modules().items():
        mine = layer(name)
        if mine is None:
            continue
        for other in imports(name, path)[0]:
            theirs = layer(other)
            if theirs is not None and LAYERS[theirs] > LAYERS[mine]:
                wrong.append(f"{name} ({mine}) imports {other} ({theirs})")
    assert not wrong, wrong


def test_every_third_party_import_is_declared():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    declared = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0] for d in declared}
    used = set()
    for name, path in modules().items():
        used |= imports(name, path)[1]
    third_party = used - set(sys.stdlib_module_names) - {"__future__"}
    unknown = third_party - set(DISTRIBUTIONS)
    assert not unknown, f"add these to DISTRIBUTIONS and pyproject: {unknown}"
    missing = {DISTRIBUTIONS[n] for n in third_party} - declared
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_third_party_import_of_the_examples_is_declared():
    """examples/ may also use the ``examples`` extra (what scripts/demo installs)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"].get(
        "examples", []
    )
    declared = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0] for d in requirements}
    scripts = sorted((ROOT / "examples").glob("*.py"))
    ours = {path.stem for path in scripts}  # an example may import another
    used = set()
    for path in scripts:
        used |= imports(f"examples.{path.stem}", path)[1]
    third_party = used - set(sys.stdlib_module_names) - {"__future__"} - ours
    known = {**DISTRIBUTIONS, **EXAMPLE_DISTRIBUTIONS}
    unknown = third_party - set(known)
    assert not unknown, f"add these to EXAMPLE_DISTRIBUTIONS and pyproject: {unknown}"
    missing = {known[n] for n in third_party} - declared
    assert not missing, f"examples import these, pyproject does not declare: {missing}"


def test_import_shardopt_leaves_flax_unimported():
    # flax.nnx costs ~0.3 s more at import (measured): only shardopt.nnx and
    # shardopt.linen import it.
    import subprocess

    code = "import sys, shardopt; print(sorted(m for m in sys.modules if 'flax' in m))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
