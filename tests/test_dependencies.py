"""The part of docs/design.md §1's dependency rule that import-linter (setup.cfg, run by
``make test``) cannot state: it treats an external package whole, so "no torch.distributed in
partition or schedulers" is checked here on the source."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_partition_and_schedulers_never_import_torch_distributed():
    files = [p for pkg in ("partition", "schedulers") for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 10
    bad = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p)
                                             if m == "torch.distributed"
                                             or m.startswith("torch.distributed."))
           for p in files}
    assert not {k: v for k, v in bad.items() if v}


def test_the_check_sees_a_violation(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch\nfrom torch.distributed import barrier\n")
    assert "torch.distributed" in imported_modules(f)
