"""Sample images from the model into a cached folder, once, with the work split across the ranks of a run.

Class images (DreamBooth's prior preservation) and Diff-Tuning's memory bank are both "N images sampled from the
pretrained model before training, one seed each, kept in a folder keyed by everything that determines them". Under
a distributed trainer every rank samples its share (image i on rank i mod world size) into one temporary folder,
and global rank 0 renames it into place when all ranks are done, so the folder appears complete or not at all. Rank
0 decides whether sampling is needed and broadcasts it, so that all ranks take the same path. The ranks must share
the cache's file system (one machine, or a shared cache folder on a cluster: set ``data.class_cache_dir`` /
``model.memory_cache_dir``). Written here because neither Lightning nor diffusers offers distributed sampling to disk.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_ft.paths import ensure_writable


def sample_into_folder(
    module,
    folder: Path,
    seeds: Sequence[int],
    inputs=None,
    prefix: str = "image",
    meta: dict | None = None,
    trainer=None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 16,
    key: str | None = None,
) -> Path:
    """Sample ``len(seeds)`` images with ``module.generate`` into ``folder`` unless it exists; image i uses
    ``seeds[i]`` and sample i of ``inputs`` (a ``SampleInputs``; None: unconditional). Returns ``folder``.
    ``key``: the config key that moves the cache (``data.class_cache_dir``), named if it cannot be written."""
    rank, world = getattr(trainer, "global_rank", 0), getattr(trainer, "world_size", 1)
    strategy = trainer.strategy if world > 1 else None  # collectives only when there are other ranks
    needed = not folder.exists()
    if strategy is not None:
        needed = strategy.broadcast(needed, src=0)
    if not needed:
        return folder
    # Before sampling, on every rank (they share the folder), so all fail alike and at once: an unwritable cache
    # named with the setting that moves it, not a PermissionError on a temporary .partial folder after the work.
    ensure_writable(folder.parent, key)
    # A partial folder of this job's own (its name chosen on rank 0 and shared): two jobs that need the same folder
    # at the same moment (two runs of one model sharing a cache) each write their own and the first to finish wins.
    name = f"{folder.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}" if rank == 0 else None
    if strategy is not None:
        name = strategy.broadcast(name, src=0)
    partial = folder.with_name(name)
    if rank == 0:
        partial.mkdir(parents=True)
    if strategy is not None:
        strategy.barrier("sample_into_folder_start")
    mine = list(range(rank, len(seeds), world))
    if mine:
        kwargs = inputs.take(mine).generate_kwargs() if inputs is not None else {}
        images = module.generate(
            **kwargs, seeds=[seeds[i] for i in mine], steps=steps, guidance_scale=guidance_scale, batch_size=batch_size
        )
        if len(images) != len(mine):
            raise RuntimeError(f"{prefix} images: asked for {len(mine)}, the model returned {len(images)}")
        for i, image in zip(mine, images):
            array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(partial / f"{prefix}_{i:06d}.png")
    if strategy is not None:
        strategy.barrier("sample_into_folder_written")
    if rank == 0:
        (partial / "meta.json").write_text(json.dumps({"count": len(seeds), **(meta or {})}))
        try:
            partial.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            shutil.rmtree(partial, ignore_errors=True)  # another job finished the same (deterministic) images first
    if strategy is not None:
        strategy.barrier("sample_into_folder_done")
    return folder
