"""Where the project's on-disk caches live."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the project's caches: $LIGHTNING_FT_CACHE, else ~/.cache/lightning_ft."""
    root = os.environ.get("LIGHTNING_FT_CACHE") or Path.home() / ".cache" / "lightning_ft"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
