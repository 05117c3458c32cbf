"""Class (prior-preservation) images sampled from the pretrained model, cached on disk.

DreamBooth's prior-preservation loss needs images of the subject's class drawn by the *pretrained* model. They
are generated once, before training, and kept in a folder keyed by the class prompt, the model's identity, the
count, the resolution, the seed and the sampler settings, so that a re-run (or another method on the same model)
reuses them. The folder is written to a temporary name and renamed when complete: an interrupted run never
leaves a half-filled cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_ft.paths import cache_dir


def class_cache_folder(
    prompt: str,
    model_identity: str,
    count: int,
    resolution: int,
    seed: int,
    root: Path | None = None,
    sampler: dict | None = None,
) -> Path:
    """The cache folder of a set of class images; ``sampler`` holds the sampling settings (scheduler, steps,
    guidance)."""
    key = json.dumps([prompt, model_identity, count, resolution, seed, sampler], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (root or cache_dir() / "class_images") / digest


def generate_class_images(module, prompt: str, count: int, folder: Path, seed: int = 0, batch_size: int = 16) -> Path:
    """Sample ``count`` images of ``prompt`` with ``module.generate`` into ``folder`` (atomically); return it."""
    if folder.exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    images = module.generate(
        prompts=[prompt] * count, seeds=[seed * 100_003 + i for i in range(count)], batch_size=batch_size
    )
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(partial / f"class_{i:05d}.png")
    (partial / "meta.json").write_text(json.dumps({"prompt": prompt, "count": count, "seed": seed}))
    partial.rename(folder)
    return folder
