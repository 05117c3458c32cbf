"""A memory bank of images sampled from the pretrained model, cached on disk (Diff-Tuning's "knowledge bank").

Like the class images of ``class_images.py``, the bank is sampled once before training and kept in a folder
keyed by everything that determines its content: the model's identity, the conditions (one prompt or label per
image, so the list may differ per image), the count, the resolution, the sampler settings and the seed. It is
written to a temporary name and renamed when complete, so an interrupted run never leaves a half-filled bank.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_ft.data.folder import list_images, load_image
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
    return (root or cache_dir() / "memory_bank") / digest


def generate_memory_bank(
    module,
    folder: Path,
    count: int,
    prompts: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> Path:
    """Sample ``count`` images with ``module.generate`` into ``folder`` (atomically) and return it.

    Image ``i`` uses ``prompts[i]`` (text models) or ``labels[i]`` (class models), or nothing (unconditional
    models), and its own seed, so the bank does not depend on ``batch_size``. An existing folder is reused."""
    if folder.exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    seeds = [seed * 100_003 + i for i in range(count)]
    condition = {"prompts": list(prompts)} if prompts is not None else {}
    if labels is not None:
        condition = {"labels": [int(label) for label in labels]}
    images = module.generate(
        **condition, seeds=seeds, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size
    )
    if len(images) != count:
        raise RuntimeError(f"memory bank: asked for {count} images, the model returned {len(images)}")
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(partial / f"memory_{i:06d}.png")
    meta = {"count": count, "seed": seed, "steps": steps, "guidance_scale": guidance_scale, **condition}
    (partial / "meta.json").write_text(json.dumps(meta))
    partial.rename(folder)
    return folder


def load_memory_bank(folder: Path) -> torch.Tensor:
    """The bank as a uint8 tensor (N, 3, H, W): a quarter of the memory of float images; convert per draw."""
    files = list_images(folder, "memory bank")
    arrays = [np.asarray(load_image(f), dtype=np.uint8) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
