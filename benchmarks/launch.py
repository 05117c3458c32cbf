"""Launching training runs for benchmarks: each run is the real CLI in a fresh single-threaded process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def data_config(experiment: str | Path) -> str | None:
    """The data config (``configs/data/....yaml``, relative to the repository) that the experiment's header
    ``# To run:`` command names, or None when it names none (the pretraining recipes, whose data module is the
    shapes world itself). The experiments hold no data: run without it, a fine-tuning experiment has no images."""
    lines = [line[1:].strip() for line in (REPO / experiment).read_text().splitlines() if line.startswith("#")]
    start = next((i for i, line in enumerate(lines) if line.startswith("To run:")), None)
    if start is None:
        return None
    command = [lines[start]]
    while command[-1].endswith("\\") and start + len(command) < len(lines):  # the command's continuation lines
        command.append(lines[start + len(command)])
    match = re.search(r"--config\s+(configs/data/\S+\.yaml)", " ".join(command))
    return match.group(1) if match else None


def config_args(experiment: str | Path) -> list[str]:
    """``--config`` arguments that run an experiment as its header says: the experiment, then its data config."""
    data = data_config(experiment)
    return ["--config", str(REPO / experiment), *(["--config", str(REPO / data)] if data else [])]


def merged_experiment(experiment: str) -> dict:
    """The experiment file merged with the data config its header names, as ``--config EXPERIMENT --config DATA``
    merges them (the data config's init args win): one config that runs the fit alone, so that a benchmark's copy of
    it also records the data its reuse decisions depend on."""
    import yaml

    config = yaml.safe_load((REPO / experiment).read_text())
    data = yaml.safe_load((REPO / data_config(experiment)).read_text())["data"]
    config["data"] = {**config["data"], **data, "init_args": {**config["data"]["init_args"], **data["init_args"]}}
    return config


def fit_run(config: str, seed: int, steps: int, root: Path, extra: list[str] = ()) -> Path:
    """``python -m lightning_ft.run fit --config CONFIG`` (and its data config) with seed, steps and output folder
    set; returns the log dir.

    One thread per process, so that ``--jobs 2`` on a 2-core machine runs two fits without oversubscription."""
    root.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, "-m", "lightning_ft.run", "fit", *config_args(config),
        "--seed_everything", str(seed), "--data.seed", str(seed), "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(root / "stdout.log", "w") as log:
        subprocess.run(args, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return max((root / "lightning_logs").iterdir(), key=lambda p: p.stat().st_mtime)
