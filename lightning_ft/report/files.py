"""Writing a report's files so that a reader never sees half of one and a failed render loses nothing."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename: the old file stays
    whole until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def write_all(files: dict[Path, bytes | str]) -> list[Path]:
    """Write every file of a report, each atomically; the contents are all built before the first is written, so a
    rendering error leaves the previous report as it was."""
    return [write_atomic(path, data) for path, data in files.items()]
