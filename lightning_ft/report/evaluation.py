"""The DreamBench-style evaluation of a run (``python -m lightning_ft.evaluate RUN`` writes ``RUN/evaluation/``):
read back, and drawn as the report's panel and card. Its table (prompt, n, subject fidelity, CLIP-I, prompt
fidelity, each with its 95% interval) is built here once, for the page and for ``evaluation.md``."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_ft.report import html

EVALUATION_DIR = "evaluation"
EVALUATION_FILE = "evaluation.json"
GRID_FILE = "grid.png"
METRICS = ("subject_fidelity", "clip_i", "prompt_fidelity")


def _number(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def estimate_text(estimate: dict | None, n: int | None = None) -> str:
    """``0.712 [0.650, 0.774]`` (mean and 95% interval; the count added when it is not the row's ``n``); ``-`` for
    a score not measured."""
    if not estimate or estimate.get("mean") is None:
        return "-"
    text = _number(estimate["mean"])
    if estimate.get("low") is not None:
        text += f" [{_number(estimate['low'])}, {_number(estimate['high'])}]"
    if n is not None and estimate.get("n") != n:
        text += f" (n={estimate.get('n')})"
    return text


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the evaluation's table: one row per prompt, then the overall and the real-images rows;
    a metric that was not measured (``metrics[name]`` None) has no column."""
    labels = result.get("metrics") or {}
    shown = [m for m in METRICS if labels.get(m)]
    header = ["prompt", "n", *[f"{labels[m]} [95% CI]" for m in shown]]
    rows = []
    for row in [*result.get("rows", []), result.get("overall"), result.get("real_images")]:
        if row:
            rows.append([str(row.get("prompt", "")), str(row.get("n", "")),
                         *[estimate_text(row.get(m), row.get("n")) for m in shown]])  # fmt: skip
    return header, rows


def read_evaluation(run_path: str | Path) -> tuple[dict | None, Path | None]:
    """``RUN/evaluation/evaluation.json`` (None when there is none) and its grid (None when absent); a file that is
    there but not an evaluation is an error naming it."""
    folder = Path(run_path) / EVALUATION_DIR
    file = folder / EVALUATION_FILE
    if not file.is_file():
        return None, None
    try:
        result = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        raise ValueError(f"{file}: not an evaluation (no 'rows' list); python -m lightning_ft.evaluate writes it")
    grid = folder / GRID_FILE
    return result, grid if grid.is_file() else None


def evaluation_card(result: dict) -> str:
    """The two axes at a glance: overall subject fidelity and prompt fidelity."""
    overall, labels = result.get("overall") or {}, result.get("metrics") or {}
    subject = overall.get("subject_fidelity") or {}
    prompt = overall.get("prompt_fidelity") or {}
    value = "subject " + (_number(subject["mean"]) if subject.get("mean") is not None else "-")
    value += " · prompt " + (_number(prompt["mean"]) if prompt.get("mean") is not None else "-")
    real = (result.get("real_images") or {}).get("subject_fidelity") or {}
    detail = f"{html.esc(labels.get('subject_fidelity') or '')} / {html.esc(labels.get('prompt_fidelity') or '-')}"
    detail += f" over {overall.get('n', '?')} samples"
    if real.get("mean") is not None:
        detail += f"; real images {_number(real['mean'])}"
    return html.card("evaluation (DreamBench-style)", value, detail)


def evaluation_section(result: dict, grid_png: bytes | None) -> str:
    """The report's panel: the table, what scored it, the grid of samples."""
    header, rows = table(result)
    settings = result.get("settings") or {}
    body = (f"<p><code>python -m lightning_ft.evaluate</code>: {len(result.get('rows', []))} prompts × "
            f"{settings.get('images_per_prompt', '?')} images, scored against "
            f"{html.esc((result.get('references') or {}).get('description', 'the references'))}. "
            f"Intervals: {html.esc(result.get('interval', ''))}.</p>")  # fmt: skip
    body += html.table(header, rows, numeric=set(range(1, len(header))))
    backbones = result.get("backbones") or {}
    items = [f"<li>{html.esc(k.replace('_', ' '))}: {html.esc(v)}</li>" for k, v in backbones.items() if v]
    items += [f"<li>{html.esc(n)}</li>" for n in result.get("notes", [])]
    if items:
        body += f"<ul>{''.join(items)}</ul>"
    if grid_png is not None:
        body += html.figure(grid_png, "evaluation samples", "One row per prompt, the same seeds in every row.")
    if result.get("command"):
        body += f"<p><code>{html.esc(result['command'])}</code></p>"
    return html.section("Evaluation (DreamBench-style)", body, "evaluation")
