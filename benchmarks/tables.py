"""Writing benchmark results: CSV and markdown tables, and figures."""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Rows (dicts) to a CSV file with a header of every key in order of appearance; a missing value is empty."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    """The rows as markdown table lines with the given columns (a missing value is empty)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


def write_table(rows: list[dict], out: str | Path, title: str, columns: list[str], notes: list[str] = ()) -> None:
    """``OUT.csv`` (every key of the rows) and ``OUT.md`` (title, the chosen columns, then the notes)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, f"{out}.csv")
    lines = [f"# {title}", "", *markdown_table(rows, columns), "", *notes]
    Path(f"{out}.md").write_text("\n".join(lines).rstrip() + "\n")


@contextlib.contextmanager
def saved_figure(path: str | Path, ncols: int, size: tuple[float, float], dpi: int = 90):
    """Yield the axes of a one-row figure of ``ncols`` panels drawn off-screen (Agg); on exit the figure is laid
    out, written to ``path`` and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, ncols, figsize=size)
    try:
        yield axes
        figure.tight_layout()
        figure.savefig(path, dpi=dpi)
    finally:
        plt.close(figure)


def fmt(value, digits: int = 3) -> str:
    """A table cell: ``-`` for None or NaN, a float to ``digits`` decimals, anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)
