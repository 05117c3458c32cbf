"""Shared fixtures: tiny components built from config (nothing is downloaded), small image folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from lightning_ft.embedded import shapes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session writes caches (class images, targets) under its own temporary folder."""
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny_components(model: str = "tiny_t2i") -> dict:
    """The component configs of configs/model/<model>.yaml: ``tiny_t2i`` (a random tiny latent text-to-image
    model) or ``tiny_dit`` (a random tiny class-conditional latent DiT with learned-sigma outputs)."""
    config = yaml.safe_load((REPO / f"configs/model/{model}.yaml").read_text())
    return config["model"]["init_args"]["components"]


def tiny_backbones(model: str = "tiny_t2i") -> dict:
    """The metric backbones the tiny configs declare: the embedded network (the tiny models draw 32x32 images)."""
    config = yaml.safe_load((REPO / f"configs/model/{model}.yaml").read_text())
    return config["model"]["init_args"]["backbones"]


def tiny_module(cls=None, model: str = "tiny_t2i", **kwargs):
    """A method (default DreamBooth) on the tiny random model of ``configs/model/<model>.yaml``."""
    from lightning_ft.methods import DreamBooth

    cls = cls or DreamBooth
    kwargs.setdefault("sample_steps", 2)
    kwargs.setdefault("backbones", tiny_backbones(model))
    config = yaml.safe_load((REPO / f"configs/model/{model}.yaml").read_text())["model"]["init_args"]
    if "sample_resolution" in config:  # e.g. Flux, whose config has no sample size
        kwargs.setdefault("sample_resolution", config["sample_resolution"])
    return cls(components=tiny_components(model), **kwargs)


def perturb(module, scale: float = 0.05) -> None:
    """Move every trainable weight by Gaussian noise: fresh tiny models output near-zero (and LoRA starts at zero),
    so comparisons of two paths would otherwise be trivially equal."""
    import torch

    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(scale * torch.randn_like(p))


def write_images(folder: Path, count: int, resolution: int = 32, seed: int = 0, captions: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        spec = shapes.spec_for_index(seed, i)
        Image.fromarray(shapes.render(spec, resolution)).save(folder / f"img_{i:02d}.png")
        if captions:
            (folder / f"img_{i:02d}.txt").write_text(spec.caption)
    return folder


def write_pairs(root: Path, second: str, names=("a", "b", "c"), size=(40, 32)) -> tuple[Path, Path]:
    """``root/images`` and ``root/<second>`` (controls or sources) of random pictures of ``size``, the same picture
    under the same name in both (the pair of ``c`` saved as JPEG: any format pairs by file stem)."""
    images, paired = root / "images", root / second
    images.mkdir(parents=True)
    paired.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(images / f"{name}.png")
        Image.fromarray(array).save(paired / (f"{name}.jpg" if name == "c" else f"{name}.png"))
    return images, paired


@pytest.fixture
def subject_dir(tmp_path) -> Path:
    return write_images(tmp_path / "subject", 3)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def quiet_trainer(**kwargs):
    """A CPU Trainer without logger, checkpoints, progress bar or model summary; ``kwargs`` add or override."""
    import lightning as L

    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def train_steps(module, batch: dict, steps: int = 3) -> dict:
    """Run ``steps`` optimizer steps of ``module.training_loss`` on one fixed batch; returns the last logs."""
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    logs = {}
    for _ in range(steps):
        loss, logs = module.training_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return logs
