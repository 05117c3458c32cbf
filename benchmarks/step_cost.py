"""One training configuration measured in its own process: step time, peak memory, and optionally the sampling
cost of the model it exports. The worker behind ``method_cost``, ``speed_options`` and ``scaling``.

A configuration (``spec``) is a JSON object:
- ``model``: ``{"class_path": ..., "init_args": {...}}`` as in an experiment file;
- ``data``: ``LimitedDataModule`` init args; ``steps`` timed steps after ``warmup`` untimed ones;
- ``device`` (``cpu`` | ``cuda``), ``precision`` (Lightning's, default ``32-true``);
- ``inference``: also export the model and time sampling from the export against the pretrained model
  (``inference_images`` images, ``inference_rounds`` alternating rounds, 25 steps, the module's guidance).

The Trainer has no logger, checkpointing or progress bar: the costs compared are those of the methods. The
framework's own cost is ``benchmarks/overhead.py``'s subject.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_class
from omegaconf import OmegaConf

from benchmarks.launch import data_config
from benchmarks.perf import now, peak_mb, reset_peak, rss_mb, run_worker, summary_ms
from lightning_ft.core.base import EXPORT_FOLDERS
from lightning_ft.data import LimitedDataModule
from lightning_ft.run import register_resolvers

REPO = Path(__file__).resolve().parents[1]
BASELINE_MB = rss_mb()  # after the imports: the floor that peak memory is reported above


def load_experiment(path: str | Path) -> tuple[dict, dict]:
    """(model, data init args) of an experiment file merged with the data config its header names (as the CLI
    merges ``--config EXPERIMENT --config DATA``: the data config's keys win), with ``${asset:}`` / ``${embedded:}``
    resolved."""
    register_resolvers()
    config = OmegaConf.load(REPO / path)
    data = data_config(path)
    if data is not None:  # the experiments hold no images or prompts: their data config does
        config = OmegaConf.merge(config, OmegaConf.load(REPO / data))
    config = OmegaConf.to_container(config, resolve=True)
    return config["model"], config["data"]["init_args"]


class StepTimer(L.Callback):
    """Wall time of every optimizer step, from one batch end to the next (data fetch included), synchronized."""

    def __init__(self, device: str):
        self.device, self.times, self.last = device, [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.last is None:
            self.last = now(self.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        t = now(self.device)
        self.times.append(t - self.last)
        self.last = t


def loader_for(folder: Path):
    """The class that loads an export back: a method that inserts modules, or plain ``DiffusionBase``."""
    from lightning_ft import methods
    from lightning_ft.core.base import DiffusionBase

    for sub, owner in EXPORT_FOLDERS.items():
        if (folder / sub).is_dir():
            return getattr(methods, owner)
    return DiffusionBase


def time_sampling(module, device: str, images: int, seeds: list[int]) -> float:
    prompts = ["a red star on a gray background"] * images
    start = now(device)
    module.generate(prompts=prompts, seeds=seeds, steps=25)
    return now(device) - start


def inference_cost(module, spec: dict) -> dict:
    """Export the module, load the export back as a user would, and time sampling against the pretrained model
    (alternating rounds, median), with the denoisers' parameter counts."""
    from lightning_ft.core.base import DiffusionBase

    device, images = spec.get("device", "cpu"), spec.get("inference_images", 8)
    guidance = module.hparams.guidance_scale
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(module.save_pretrained(Path(tmp) / "export"))
        exported = loader_for(folder)(pretrained=str(folder), guidance_scale=guidance).to(device).eval()
        h = module.hparams
        base = DiffusionBase(pretrained=h.pretrained, components=h.components, guidance_scale=guidance)
        base = base.to(device).eval()
        seeds = list(range(images))
        times = {"base": [], "export": []}
        for _ in range(spec.get("inference_rounds", 3)):
            times["base"].append(time_sampling(base, device, images, seeds))
            times["export"].append(time_sampling(exported, device, images, seeds))
    count = lambda m: sum(p.numel() for p in m.denoiser.parameters())  # noqa: E731
    return {
        "sample_ms_per_image": round(1000 * sorted(times["export"])[len(times["export"]) // 2] / images, 2),
        "base_sample_ms_per_image": round(1000 * sorted(times["base"])[len(times["base"]) // 2] / images, 2),
        "export_denoiser_params": count(exported),
        "base_denoiser_params": count(base),
    }


def measure(spec: dict) -> dict:
    device = spec.get("device", "cpu")
    warmup, steps = spec.get("warmup", 5), spec.get("steps", 30)
    torch.manual_seed(spec.get("seed", 0))
    module = instantiate_class((), spec["model"])
    data = LimitedDataModule(**spec["data"])
    timer = StepTimer(device)
    trainer = L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=warmup + steps,
        precision=spec.get("precision", "32-true"), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], limit_val_batches=0,
    )  # fmt: skip
    reset_peak(device)
    start = time.perf_counter()
    trainer.fit(module, data)
    fit_s = time.perf_counter() - start
    peak = peak_mb(device)
    result = {
        **summary_ms(timer.times[warmup:]),
        "steps": len(timer.times) - warmup,
        "first_step_s": round(timer.times[0], 3),
        "setup_s": round(fit_s - sum(timer.times), 2),
        "peak_mb": round(peak - (BASELINE_MB if device == "cpu" else 0), 1),
        "trainable_params": sum(p.numel() for p in module.trainable_parameters()),
    }
    if spec.get("inference"):
        result.update(inference_cost(module, spec))
    return result


def measure_isolated(spec: dict, cpu: int | None = None) -> dict:
    """``measure(spec)`` in a fresh process (its peak memory is its own)."""
    return run_worker("benchmarks.step_cost", spec, cpu=cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", required=True, help="the configuration, as JSON")
    args = parser.parse_args(argv)
    print(json.dumps(measure(json.loads(args.worker))))


if __name__ == "__main__":
    main()
