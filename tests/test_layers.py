"""Layers point down only: flows/ -> pipeline/ -> models/ and stores/ -> mmcache/.

Scans every module's imports (including imports inside functions) with ``ast``, so a
lazy ``from pipeline.x import y`` inside a model or store function is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> packages of this project it must never import
FORBIDDEN = {
    "mmcache": {"pipeline", "flows", "models", "stores"},
    "models": {"pipeline", "flows", "stores"},
    "stores": {"pipeline", "flows", "models"},
    "pipeline": {"flows"},
}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_roots(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_scanner_sees_lazy_imports(tmp_path):
    # the check itself can fail: a function-level import of a layer above is found
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipeline.errors import ConfigError\n    return ConfigError\n")
    assert "pipeline" in _imported_roots(module)
