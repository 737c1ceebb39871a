"""The layout rules of DESIGN.md, checked on the source: kernels/ knows nothing of classreg/, only the public API and
the CLI import a solver, no command-line code inside the solvers, and no import cycle between modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / "kernels").is_dir(), reason="needs the source tree")

#: modules allowed to import a solver package (DESIGN.md: the public API, the CLI, the elastix front end — the
#: package and its modules —, batch)
SOLVER_IMPORTERS = {"classreg", "classreg.cli", "classreg.elastix", "classreg.batch"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["classreg", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, *, top_level_only: bool = False):
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            for a in node.names:  # "from . import evaluate" imports a submodule
                yield f"{mod}.{a.name}"


def _sources():
    return sorted(p for d in ("classreg", "kernels") for p in (ROOT / d).rglob("*.py"))


def test_kernels_import_nothing_from_classreg():
    for path in (ROOT / "kernels").rglob("*.py"):
        for mod in _imports(path):
            assert not (mod.startswith("classreg") and not mod.startswith("classreg.kernels")), (path, mod)


def test_only_the_api_and_the_cli_import_solvers():
    for path in _sources():
        me = _module_name(path)
        if me.startswith("classreg.solvers"):
            continue
        for mod in _imports(path):
            if mod.startswith("classreg.solvers"):
                assert me in SOLVER_IMPORTERS or me.split(".")[:2] == ["classreg", "elastix"], (me, mod)


def test_no_command_line_code_in_the_solvers():
    for path in (ROOT / "classreg" / "solvers").rglob("*.py"):
        assert "argparse" not in set(_imports(path)), path


def _check_acyclic(graph: dict) -> None:
    """Raise AssertionError naming a cycle of ``graph`` (module -> modules it imports at module level); a package
    importing its own submodules from its ``__init__`` is not counted."""
    state: dict = {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1 and not m.startswith(d + "."):
                raise AssertionError("import cycle: " + " -> ".join(stack + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_cycle_check_finds_a_cycle():
    _check_acyclic({"p": {"p.a"}, "p.a": {"p.b"}, "p.b": set()})  # a package importing its submodules is fine
    with pytest.raises(AssertionError, match="p.a -> p.b -> p.a"):
        _check_acyclic({"p.a": {"p.b"}, "p.b": {"p.a"}})


def test_no_module_level_import_cycle():
    modules = {_module_name(p): p for p in _sources()}
    _check_acyclic({m: {d for d in _imports(p, top_level_only=True) if d in modules and d != m}
                    for m, p in modules.items()})
