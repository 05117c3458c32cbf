"""Writing benchmark results: one CSV per table (the markdown beside it is each benchmark's own)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Rows (dicts) to a CSV file with a header of every key in order of appearance; a missing value is empty."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
