"""A memory bank of images sampled from the pretrained model, cached on disk (Diff-Tuning's "knowledge bank").

Like the class images of ``class_images.py``, the bank is sampled once before training and kept in a folder
keyed by everything that determines its content: the model's identity, the conditions (one prompt or label per
image, so the list may differ per image), the count, the resolution, the sampler settings and the seed. It is
written to a temporary name and renamed when complete, so an interrupted run never leaves a half-filled bank.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lightning_ft.data.folder import list_images, load_image
from lightning_ft.data.sampled_folder import sample_into_folder
from lightning_ft.paths import cache_dir

#: Bumped when the on-disk layout or the sampling code changes, so old banks are not reused.
VERSION = 1


def memory_bank_folder(
    model_identity: str,
    conditions: Sequence[str] | Sequence[int] | None,
    count: int,
    resolution: int,
    sampler: dict,
    seed: int = 0,
    root: Path | None = None,
) -> Path:
    """The cache folder of a bank; ``sampler`` holds the sampling settings (scheduler, steps, guidance)."""
    conditions = list(conditions) if conditions is not None else None
    key = json.dumps([VERSION, model_identity, conditions, count, resolution, sampler, seed], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (root or cache_dir("model.memory_cache_dir") / "memory_bank") / digest


def generate_memory_bank(
    module,
    folder: Path,
    inputs,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    trainer=None,
) -> Path:
    """Sample ``len(inputs)`` images with ``module.generate`` into ``folder`` (atomically) and return it.

    Image ``i`` is asked with sample ``i`` of ``inputs`` (a ``SampleInputs``: prompts, labels or nothing) and its own
    seed, so the bank does not depend on ``batch_size`` or on how the work is split across the ranks of ``trainer``
    (see ``sampled_folder``). An existing folder is reused."""
    meta = {"seed": seed, "steps": steps, "guidance_scale": guidance_scale, **inputs.meta()}
    return sample_into_folder(
        module,
        folder,
        seeds=[seed * 100_003 + i for i in range(len(inputs))],
        inputs=inputs,
        prefix="memory",
        meta=meta,
        trainer=trainer,
        steps=steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        key="model.memory_cache_dir",
    )


def load_memory_bank(folder: Path) -> torch.Tensor:
    """The bank as a uint8 tensor (N, 3, H, W): a quarter of the memory of float images; convert per draw."""
    files = list_images(folder, "memory bank")
    arrays = [np.asarray(load_image(f), dtype=np.uint8) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
