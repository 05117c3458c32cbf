"""Launching training runs for benchmarks: each run is the real CLI in a fresh single-threaded process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fit_run(config: str, seed: int, steps: int, root: Path, extra: list[str] = ()) -> Path:
    """``python -m lightning_ft.run fit --config CONFIG`` with seed, steps and output folder set; returns the log dir.

    One thread per process, so that ``--jobs 2`` on a 2-core machine runs two fits without oversubscription."""
    root.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable, "-m", "lightning_ft.run", "fit", "--config", str(REPO / config),
        "--seed_everything", str(seed), "--data.seed", str(seed), "--trainer.max_steps", str(steps),
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(root / "stdout.log", "w") as log:
        subprocess.run(args, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return max((root / "lightning_logs").iterdir(), key=lambda p: p.stat().st_mtime)
