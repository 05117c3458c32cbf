"""The framework ends where the embedded world begins: core, methods, callbacks, metrics, data and nn never import
``lightning_ft.embedded``; they reach its metric network only through what a model folder declares."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ft"
FRAMEWORK = ("core", "methods", "callbacks", "metrics", "data", "nn")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_framework_module_imports_the_embedded_world():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for part in FRAMEWORK
        for path in sorted((PACKAGE / part).rglob("*.py"))
        for name in imported_modules(path)
        if name.startswith("lightning_ft.embedded")
    ]
    assert offenders == []


def test_importing_the_framework_loads_nothing_of_the_embedded_world():
    code = (
        "import sys\n"
        + "".join(f"import lightning_ft.{part}\n" for part in FRAMEWORK)
        + "print(sorted(m for m in sys.modules if m.startswith('lightning_ft.embedded')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
