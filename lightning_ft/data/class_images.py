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
from pathlib import Path

from lightning_ft.data.sampled_folder import sample_into_folder
from lightning_ft.paths import cache_dir


def class_cache_folder(
    prompt: str | int | None,
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
    return (root or cache_dir("data.class_cache_dir") / "class_images") / digest


def generate_class_images(module, inputs, folder: Path, seed: int = 0, batch_size: int = 16, trainer=None) -> Path:
    """Sample one image per sample of ``inputs`` (a ``SampleInputs``: the class prompt, or the class label of a
    class-conditional model, repeated) with ``module.generate`` into ``folder`` (atomically; split across the ranks
    of ``trainer`` when given, see ``sampled_folder``); return it."""
    first = inputs.values()[0] if len(inputs) else None
    return sample_into_folder(
        module,
        folder,
        seeds=[seed * 100_003 + i for i in range(len(inputs))],
        inputs=inputs,
        prefix="class",
        meta={"condition": first, "seed": seed},
        trainer=trainer,
        batch_size=batch_size,
        key="data.class_cache_dir",
    )
