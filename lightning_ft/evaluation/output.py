"""What an evaluation writes: ``evaluation.json`` (every number, with its count and interval), ``evaluation.md``
(the table, what scored it and the command) and ``grid.png`` (one row per prompt, labelled with it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_ft.callbacks.sample_grid import make_grid
from lightning_ft.evaluation.statistics import estimate
from lightning_ft.report.evaluation import EVALUATION_FILE, GRID_FILE, METRICS, table
from lightning_ft.report.figures import labelled_panels
from lightning_ft.report.files import write_atomic

MARKDOWN_FILE = "evaluation.md"
REAL_IMAGES = "real images (leave-one-out)"
#: Side of a sample in the grid: small models' samples are enlarged (nearest), large ones reduced.
GRID_CELL = 128


def _row(prompt: str, n: int, scores: dict, part, bounds) -> dict:
    row = {"prompt": prompt, "n": n}
    row.update({m: None if scores[m] is None else estimate(scores[m][part], bounds(m)).as_dict() for m in METRICS})
    return row


def score_rows(scores: dict, prompts: list[str], per_prompt: int, bounds=lambda metric: None) -> tuple[list, dict]:
    """Per-prompt rows and the overall row from per-sample scores (each (len(prompts) * per_prompt,), prompt-major;
    None for a metric not measured): the mean, 95% interval and count of each metric; ``bounds(metric)``: the
    score's range, which intervals are clipped to (None: not clipped)."""
    rows = [
        _row(prompt, per_prompt, scores, slice(k * per_prompt, (k + 1) * per_prompt), bounds)
        for k, prompt in enumerate(prompts)
    ]
    return rows, _row("overall", len(prompts) * per_prompt, scores, slice(None), bounds)


def reference_row(scores: dict, n: int, prompt: str | None, bounds=lambda metric: None) -> dict:
    """The real-images row: the references' leave-one-out scores (their prompt fidelity against ``prompt``)."""
    return _row(REAL_IMAGES, n, scores, slice(None), bounds)


def grid_image(samples: torch.Tensor, prompts: list[str], per_prompt: int, title: str) -> Image.Image:
    """The samples, one row per prompt (labelled with it), ``per_prompt`` columns, each cell ``GRID_CELL`` px."""
    grid = Image.fromarray(make_grid(samples, per_prompt))
    grid = grid.resize((per_prompt * GRID_CELL, len(prompts) * GRID_CELL),
                       Image.NEAREST if samples.shape[-1] <= GRID_CELL else Image.LANCZOS)  # fmt: skip
    return labelled_panels([(title, grid, "black")], row_labels=prompts, max_height=grid.height)


def markdown(result: dict) -> str:
    header, rows = table(result)
    settings = result["settings"]
    lines = [
        f"# Evaluation (DreamBench-style): {result['title']}",
        "",
        f"- model: `{result['model']}`" + (f" (run `{result['run']}`)" if result.get("run") else ""),
        f"- prompts: {len(result['rows'])}, from {result['prompts_from']}",
        f"- samples: {settings['images_per_prompt']} per prompt (seeds {', '.join(map(str, settings['seeds']))}), "
        f"{settings['steps']} steps, guidance {settings['guidance_scale']}, {settings['resolution']} px",
        f"- references: {result['references']['description']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows],
        "",
        f"Intervals: {result['interval']}.",
        "",
        "Backbones:",
        *[f"- {k.replace('_', ' ')}: {v}" for k, v in result["backbones"].items() if v],
        *[f"- {note}" for note in result["notes"]],
        "",
        f"Command: `{result['command']}`",
        "",
        f"Samples: `{GRID_FILE}` (one row per prompt).",
        "",
    ]
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def write_outputs(out: Path, result: dict, grid: Image.Image) -> dict[str, Path]:
    """``evaluation.json``, ``evaluation.md`` and ``grid.png`` in ``out`` (each written atomically, the JSON
    last: a report that finds it finds the rest)."""
    out.mkdir(parents=True, exist_ok=True)
    grid_path = out / GRID_FILE
    tmp = out / f".{GRID_FILE}.tmp.png"
    grid.save(tmp)
    tmp.replace(grid_path)
    paths = {
        "grid": grid_path,
        "markdown": write_atomic(out / MARKDOWN_FILE, markdown(result)),
        "json": write_atomic(out / EVALUATION_FILE, json.dumps(_json_safe(result), indent=1) + "\n"),
    }
    return paths
