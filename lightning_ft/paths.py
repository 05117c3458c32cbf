"""Where the project's on-disk caches live, and a clear error when one cannot be written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: The environment variable that moves every cache of the project (class images, memory banks, embedded targets).
CACHE_ENV = "LIGHTNING_FT_CACHE"


class CacheNotWritableError(PermissionError):
    """A cache folder that cannot be created or written; the message names it, the setting that moves it and
    ``$LIGHTNING_FT_CACHE``. A ``PermissionError``, so code that caught the raw error still catches this one."""


def cache_root() -> Path:
    """$LIGHTNING_FT_CACHE, else ~/.cache/lightning_ft (not created)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_ft")


def cache_dir(key: str | None = None) -> Path:
    """Root of the project's caches: $LIGHTNING_FT_CACHE, else ~/.cache/lightning_ft, created if missing. ``key``:
    the setting that would put the cache at hand elsewhere (``data.class_cache_dir``), named in the error."""
    path = cache_root()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheNotWritableError(unwritable_message(path, error, key)) from None
    return path


def ensure_writable(folder: Path, key: str | None = None) -> None:
    """Create ``folder`` and check that a file can be written in it, before any long work whose output goes there
    (sampling class images or a memory bank); otherwise raise ``CacheNotWritableError`` naming the folder, ``key``
    (the config key that moves it) and $LIGHTNING_FT_CACHE, instead of a raw error on a temporary file inside."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise CacheNotWritableError(unwritable_message(folder, error, key)) from None


def unwritable_message(folder: Path, error: OSError, key: str | None) -> str:
    reason = f"{type(error).__name__}: {error.strerror or error}"
    root = f"{CACHE_ENV} (the root of lightning-ft's caches, now {str(cache_root())!r})"
    where = f"set {key}, or {root}, to a writable folder" if key else f"set {root} to a writable folder"
    return f"{key + ': ' if key else ''}cannot write the cache folder {str(folder)!r} ({reason}); {where}"
