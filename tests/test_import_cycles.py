"""No import cycle between the project's modules, counting the imports inside functions (the
usual way a cycle is hidden): an AST scan of every module of the four packages."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("asyncdiff", "partition", "schedulers", "experiments")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules ``module`` imports, anywhere in it (a ``from package import name``
    counts the submodule ``package.name`` when there is one, else the package)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            subs = {f"{name}.{a.name}" for a in node.names} & known
            out |= subs or {name}
    return {m for m in out if m in known}


def import_graph() -> nx.DiGraph:
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    g = nx.DiGraph()
    g.add_nodes_from(known)
    for module, path in files.items():
        for dep in _imports(path, module, known):
            if dep != module and not module.startswith(dep + "."):  # a package's own child
                g.add_edge(module, dep)
    return g


def test_the_scan_sees_imports_inside_functions():
    g = import_graph()
    # experiments/checks.py imports the step cache inside check_modes, nowhere else
    assert g.has_edge("experiments.checks", "asyncdiff.step_cache")
    assert g.number_of_edges() > 200


def test_no_module_imports_itself_back():
    cycles = sorted(sorted(c) for c in nx.simple_cycles(import_graph()) if len(c) > 1)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:10])
