"""What the benchmarks that train share: one fit through the CLI in a subprocess (reused when a finished one is on
disk) and the Student-t interval their tables report over seeds."""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.launch import REPO


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the Student-t interval, n) of the finite values; half-width NaN for n < 2."""
    from scipy.stats import t

    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = statistics.fmean(values)
    if n == 1:
        return mean, math.nan, 1
    return mean, float(t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n), n


def run_fit(job: dict, finished: Callable[[Path, int, dict], Path | None], curve: str) -> tuple[Path, float, float]:
    """Run one fit of ``job`` (``root``, ``settings``, ``config``, ``seed``, ``steps``, ``extra``) through
    ``python -m lightning_ft.run fit``, one thread, output in ``root/stdout.log``, or reuse the run ``finished``
    finds; returns its log dir, its wall time and its CPU time in seconds (recorded in ``root/bench.json``).
    ``curve``: the monitor file whose final row says the fit ended (named in the error when it is missing)."""
    root, settings = job["root"], job["settings"]
    done = finished(root, job["steps"], settings)
    if done is not None:
        record = json.loads((root / "bench.json").read_text())
        return done, float(record.get("seconds", math.nan)), float(record.get("cpu_seconds", math.nan))
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench.json").write_text(json.dumps({"settings": settings}, indent=1))
    command = [
        sys.executable, "-m", "lightning_ft.run", "fit", "--config", str(job["config"]),
        "--seed_everything", str(job["seed"]), "--data.seed", str(job["seed"]),
        "--trainer.max_steps", str(job["steps"]), "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root), *job["extra"],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(root / "stdout.log", "w") as log:
        subprocess.run(command, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time of the fit process (exact with one job at a time; with more, the children's times mix)
    cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    record = {"settings": settings, "seconds": seconds, "cpu_seconds": cpu_seconds}
    (root / "bench.json").write_text(json.dumps(record, indent=1))
    log_dir = finished(root, job["steps"], settings)
    if log_dir is None:
        raise RuntimeError(f"{root}: the fit ended without the final row of {curve}")
    return log_dir, seconds, cpu_seconds


class SavesSamples:
    """Mixin for a monitor (``PeriodicEvaluation`` with ``sample`` and ``measure``): the monitor unchanged, plus the
    images of every evaluation written as ``<log dir>/<samples_folder>/step_XXXXXX.png`` (actual size): the exact
    samples behind each point of a curve, for grids and for looking at a dip without sampling again."""

    samples_folder = "monitor_samples"

    def sample_columns(self, images) -> int:
        """Columns of a saved grid (default: one per sampling seed)."""
        return len(self.seeds)

    def sample(self, pl_module):
        self._last_images = super().sample(pl_module)
        return self._last_images

    def measure(self, pl_module, step: int) -> dict:
        from lightning_ft.callbacks.sample_grid import save_grid

        point = super().measure(pl_module, step)
        folder = self.csv_file.parent / self.samples_folder
        folder.mkdir(parents=True, exist_ok=True)
        images = self._last_images
        save_grid(images, folder / f"step_{int(step):06d}.png", columns=self.sample_columns(images), upscale=1)
        return point
