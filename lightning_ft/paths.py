"""Where the project's shipped assets and its on-disk caches live."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def asset_path(name: str) -> Path:
    """Path of a shipped asset folder; a clear error names the folder when it is missing."""
    path = ASSETS_DIR / name
    if not path.exists():
        available = (
            sorted(p.name for p in ASSETS_DIR.iterdir() if not p.name.startswith("_")) if ASSETS_DIR.exists() else []
        )
        raise FileNotFoundError(f"asset {name!r} not found at {path}; available: {available}")
    return path


def cache_dir() -> Path:
    """Root of the project's caches: $LIGHTNING_FT_CACHE, else ~/.cache/lightning_ft."""
    root = os.environ.get("LIGHTNING_FT_CACHE") or Path.home() / ".cache" / "lightning_ft"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
