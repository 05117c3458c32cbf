"""Tiny synthetic run folders, written as a fit writes them: metrics.csv (sparse rows, as the CSV logger writes),
corruption_stage.csv, samples/step_*.png, config.yaml and run_cost.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

CORRUPTION_COLUMNS = ("step", "fidelity", "progress", "score", "memorisation", "diversity", "hf_energy",
                      "class_prior", "ceiling", "stage", "stage_code")  # fmt: skip
STAGE_CODES = {"unknown": -1, "adapting": 0, "corruption": 1, "memorising": 2}
PROMPTS = ["a sks star on gray", "a sks star on black"]

#: A curve that rises, dips into a noisy corruption stage at steps 30-40 and recovers into memorisation.
DIP = [
    (0, 0.20, 0.3, "adapting"), (10, 0.55, 0.8, "adapting"), (20, 0.70, 0.9, "adapting"),
    (30, 0.40, 2.2, "corruption"), (40, 0.45, 2.0, "corruption"), (50, 0.72, 1.1, "adapting"),
    (60, 0.80, 0.9, "memorising"),
]  # fmt: skip


def write_csv(path: Path, columns, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def grid_png(path: Path, rows: int, columns: int, cell: int = 16, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (rows * cell, columns * cell, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_run(
    root: Path,
    name: str = "run",
    curve=DIP,
    fid: list[float] | None = None,
    fid_samples: int = 16,
    samples: tuple[int, ...] = (20, 40, 60),
    cost: bool = True,
    corruption: bool = True,
    levels: tuple[float, float] = (0.3, 0.9),
    steps: int = 60,
) -> Path:
    """A run folder under ``root/name/lightning_logs/version_0``; ``fid`` values are spread over the steps."""
    folder = root / name / "lightning_logs" / "version_0"
    (folder / "samples").mkdir(parents=True)
    instance_dir = root / f"{name}_instances"
    instance_dir.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, dtype=np.uint8)).save(instance_dir / f"img_{i}.png")
    rows = []
    for step in range(9, steps, 10):
        rows.append({"epoch": 0, "step": step, "train/loss": 1.0 / (1 + step), "train/loss/kl": 5000.0})
    for k, value in enumerate(fid or []):
        step = round(k * steps / max(1, len(fid) - 1))
        rows.append({"step": step, "fid/fid": value, "fid/kid": value / 1e4, "fid/kid_x1000": value / 10,
                     "fid/num_samples": fid_samples, "fid/num_reference": 100})  # fmt: skip
    columns = ["epoch", "step", "train/loss", "train/loss/kl"]
    if fid:
        columns += ["fid/fid", "fid/kid", "fid/kid_x1000", "fid/num_samples", "fid/num_reference"]
    write_csv(folder / "metrics.csv", columns, rows)
    if corruption:
        prior, ceiling = levels
        write_csv(folder / "corruption_stage.csv", CORRUPTION_COLUMNS, [
            {"step": s, "fidelity": f, "progress": (f - prior) / (ceiling - prior), "score": c,
             "memorisation": f + 0.05, "diversity": 0.3, "hf_energy": 0.1, "class_prior": prior,
             "ceiling": ceiling, "stage": stage, "stage_code": STAGE_CODES[stage]}
            for s, f, c, stage in curve
        ])  # fmt: skip
    for k, step in enumerate(samples):
        grid_png(folder / "samples" / f"step_{step:06d}.png", len(PROMPTS), 2, seed=k)
    config = {
        "trainer": {"max_steps": steps, "callbacks": [
            {"class_path": "lightning_ft.callbacks.SampleGridLogger",
             "init_args": {"prompts": PROMPTS, "seeds": [0, 1]}},
            {"class_path": "lightning_ft.callbacks.CorruptionStageMonitor", "init_args": {"noise_factor": 1.5}},
        ]},
        "model": {"class_path": "lightning_ft.methods.DreamBooth", "init_args": {"pretrained": "org/base", "lr": 1e-4}},
        "data": {"class_path": "lightning_ft.data.LimitedDataModule",
                 "init_args": {"instance_dir": str(instance_dir), "instance_prompt": PROMPTS[0],
                               "num_class_images": 4}},
    }  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if cost:
        (folder / "run_cost.json").write_text(json.dumps({
            "status": "finished", "wall_seconds": 12.5, "steps": steps, "start_step": 0, "end_step": steps,
            "steps_per_second": steps / 12.5, "peak_memory_bytes": 3 * 2**30, "peak_memory_kind": "process_peak_rss",
            "device": "cpu"}))  # fmt: skip
    return folder
