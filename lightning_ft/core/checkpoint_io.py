"""Atomic checkpoint writes: a checkpoint file is either the old one or the complete new one, never half written.

Lightning's ``TorchCheckpointIO`` writes the final path directly, so a process killed during a save (SIGKILL, a
preempted job) can leave a truncated ``last.ckpt`` that then fails to load, or loads wrong. This writes a sibling
temporary file and renames it over the target (``os.replace``, atomic on POSIX and Windows for one file system).
A save that fails (disk full) removes its temporary file and raises. The CLI installs it by default
(``trainer.plugins``).
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic renames of a complete temporary file (local paths)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        target = str(path)
        if "://" in target:  # remote file systems: their own semantics
            return super().save_checkpoint(checkpoint, path, storage_options)
        partial = Path(f"{target}.partial")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            os.replace(partial, target)
        except BaseException:
            # A failed write (disk full, an interrupt) leaves the previous checkpoint as it was, and no half file.
            partial.unlink(missing_ok=True)
            raise
