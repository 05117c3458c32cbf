"""The framework ends where the embedded world begins: core, methods, callbacks, metrics, data and nn never import
``lightning_ft.embedded``; they reach its metric network only through what a model folder declares."""

from __future__ import annotations

import ast
import re
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


# ------------------------------------------------------------------------------------------ layers and circles
#: Each package of ``lightning_ft`` and its layer: a module imports only from lower layers (or its own package), so
#: packages of one layer never import each other (core and nn, methods and callbacks). Every import counts, those
#: inside functions too: a lazy import is still an arrow.
LAYERS = {
    "paths": 0, "attention": 0, "images": 0,
    "metrics": 1, "data": 1, "report": 1,
    "core": 2, "nn": 2,
    "methods": 3, "callbacks": 3, "embedded": 3,
    "cli": 4, "strategies": 4, "evaluation": 4,
    "run": 5, "evaluate": 5, "sweep": 6,
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path):
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in import_graph()} - {""}
    assert packages <= set(LAYERS), sorted(packages - set(LAYERS))


def test_no_import_goes_up_or_across_the_layers():
    offenders = []
    for module, targets in import_graph().items():
        here = package_of(module)
        for target in targets:
            there = package_of(target)
            if here and there and here != there and LAYERS[there] >= LAYERS[here]:
                offenders.append(f"{module} ({here}, layer {LAYERS[here]}) imports {target} (layer {LAYERS[there]})")
    assert offenders == []


def test_no_method_imports_another_method():
    # Except the DreamBooth baseline: BNN and A3FTA are DreamBooth (prior preservation) with their own layers, as in
    # their papers and released code.
    graph = import_graph()
    offenders = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m.startswith("lightning_ft.methods.") and m != "lightning_ft.methods"
        for t in targets
        if t.startswith("lightning_ft.methods.") and t not in (m, "lightning_ft.methods.dreambooth")
    ]
    assert offenders == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    # A package's __init__ re-exporting its own modules is not a circle between ideas: edges from a package to its
    # own submodules are left out (a submodule importing its package's __init__ is kept).
    graph = {
        m: {t for t in targets if not t.startswith(m + ".")} for m, targets in import_graph().items()
    }
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_checks_catch_a_circle_and_an_upward_arrow():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert LAYERS["core"] == LAYERS["nn"] and LAYERS["report"] < LAYERS["callbacks"]


def test_no_conditioning_kind_or_family_name_is_compared_outside_the_families():
    """The family owns what is model-specific: nowhere else is a model family named or the conditioning kind asked."""
    from lightning_ft.core.families import REGISTRY

    family_names = tuple(sorted(REGISTRY, key=len, reverse=True))  # every registered family, longest name first
    assert {"stable_diffusion", "sdxl", "flux2_klein", "z_image"} <= set(family_names)
    pattern = re.compile(
        r"""(==|!=|\bin)\s*\(?\s*["'](text|class|prompts|labels|"""
        + "|".join(family_names)
        + r""")["']|["'](text|class|prompts|labels|"""
        + "|".join(family_names)
        + r""")["']\s*(==|!=)|\.conditioning\b|\.kind\s*==|input_key"""
        + r"""|__name__\s*==\s*["']\w+(Pipeline|Model)["']"""
    )
    offenders = []
    # The benchmarks too: they drive the framework as a user's script does (a stale `module.conditioning` there once
    # crashed a benchmark that no test runs).
    for path in sorted([*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "benchmarks").rglob("*.py")]):
        if "families" in path.parts or "embedded" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert offenders == []
