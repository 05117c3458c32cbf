"""What a model family costs in this codebase: its lines, and which files outside its own name it.

To run: python -m benchmarks.family_cost      (a few seconds; writes benchmarks/results/family_cost.md and .csv)

For every registered family (``lightning_ft.core.families.REGISTRY``): the lines of its class (with docstring and
comments; and without them: code only), the lines of the file that holds it (a file may hold siblings: SD and SDXL,
SD3 and Flux, FLUX.2 dev and klein), and the files of the repository that name it outside its own file (its module or
class name, or its ``model.family`` name in quotes): the registration line in ``families/__init__.py``, its tiny
config, its tests, the README and docs. A family that needs a change elsewhere shows up here as another file.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import tokenize
from pathlib import Path

from benchmarks.tables import write_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SEARCHED = ("lightning_ft", "configs", "experiments", "tests", "docs", "benchmarks", "README.md")
#: Files that list every family by design, not because a family needed a change there.
CATALOGUES = ("benchmarks/family_cost.py", "tests/test_layering.py")


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    lines = set()
    previous = None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.STRING and previous in (tokenize.INDENT, tokenize.NEWLINE, tokenize.DEDENT, None):
            previous = token.type
            continue  # a docstring (a string that is a statement of its own)
        if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):  # fmt: skip
            lines.update(range(token.start[0], token.end[0] + 1))
        if token.type not in (tokenize.COMMENT, tokenize.NL):
            previous = token.type
    return len(lines)


def repository_files() -> list[Path]:
    files = []
    for entry in SEARCHED:
        path = REPO / entry
        candidates = [path] if path.is_file() else path.rglob("*")
        files += [p for p in candidates
                  if p.is_file() and p.suffix in (".py", ".yaml", ".md") and "results" not in p.parts]  # fmt: skip
    return sorted(files)


def depends_on(path: Path, cls, module: str) -> bool:
    """A Python file depends on a family when it imports the family's module or class, or holds its ``model.family``
    name as a string that is not a docstring (prose that mentions a family as an example is not a dependency)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}  # fmt: skip
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.endswith(f"families.{module}") or any(a.name == cls.__name__ for a in node.names):
                return True
        if isinstance(node, ast.Constant) and node.value in (cls.name, module) and id(node) not in docstrings:
            return True
    return False


def naming_files(cls, own: Path, files: list[Path]) -> list[str]:
    """Files other than its own that depend on the family (Python) or name it (``model.family`` name or its tiny
    config in YAML and markdown)."""
    module = own.stem
    text_pattern = re.compile(rf"`{re.escape(cls.name)}`|tiny_{re.escape(cls.name)}\b|family: {re.escape(cls.name)}\b")
    out = []
    for path in files:
        rel = str(path.relative_to(REPO))
        if path == own or rel in CATALOGUES:
            continue
        if path.suffix == ".py" and depends_on(path, cls, module):
            out.append(rel)
        elif path.suffix != ".py" and text_pattern.search(path.read_text(errors="ignore")):
            out.append(rel)
    return out


def main() -> None:
    from lightning_ft.core.families import REGISTRY

    files = repository_files()
    rows = []
    for name, cls in REGISTRY.items():
        own = Path(inspect.getsourcefile(cls))
        source, _ = inspect.getsourcelines(cls)
        text = "".join(source)
        named = naming_files(cls, own, files)
        kinds = {"tests": [f for f in named if f.startswith("tests/")],
                 "configs": [f for f in named if f.startswith(("configs/", "experiments/"))],
                 "docs": [f for f in named if f.endswith(".md")]}  # fmt: skip
        code = [f for f in named if f not in sum(kinds.values(), [])]
        rows.append({
            "family": name, "class": cls.__name__, "file": str(own.relative_to(REPO)),
            "class lines": len(source), "class code lines": code_lines(text),
            "file lines": len(own.read_text().splitlines()),
            "code files naming it": len(code), "which": ", ".join(code),
            "tests": len(kinds["tests"]), "configs": len(kinds["configs"]), "docs": len(kinds["docs"]),
        })  # fmt: skip
    notes = [
        "Class lines include the class's docstring and comments; code lines leave them out (tokenize). Code files "
        "naming it: Python files under lightning_ft/ and benchmarks/ other than its own that import its module or "
        "class or hold its `model.family` name as a string (not in a docstring): the registration line in "
        "`families/__init__.py` is one, and a family built on another's file (a sibling base) shows it. Tests (any "
        "Python file under tests/ that does the same), configs (YAML naming its tiny config or family) and docs "
        "(markdown naming it in backticks) are counted apart.",
        "",
        "Command: `python -m benchmarks.family_cost`.",
    ]
    columns = ["family", "file", "class lines", "class code lines", "file lines", "code files naming it", "which",
               "tests", "configs", "docs"]  # fmt: skip
    write_table(rows, RESULTS / "family_cost", "What a model family costs", columns, notes)
    print((RESULTS / "family_cost.md").read_text())


if __name__ == "__main__":
    main()
