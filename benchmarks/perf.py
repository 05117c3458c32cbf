"""Measuring cost: step timing, peak memory and isolated worker processes for the performance benchmarks.

Peak memory on CUDA is the caching allocator's ``max_memory_allocated``; on CPU torch keeps no allocator statistics,
so it is the process's high-water resident set (``VmHWM``, see ``peak_mb``). Because a high-water mark cannot be
reset, every configuration whose memory is reported runs in its own worker process (``run_worker``), and the memory
reported is the peak minus the process's resident set after imports (``baseline_mb``): model, optimizer state,
activations, frozen copies and caches.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_ft.report.cost import peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def now(device: str) -> float:
    sync(device)
    return time.perf_counter()


def rss_mb() -> float:
    """The resident set of this process now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> float:
    """Peak memory since the last ``reset_peak`` (CUDA) or since the process started (CPU), in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent at fork, so a worker started by a benchmark
    # that has trained in-process would report the parent's size (seen: 228 and 354 MiB instead of 163 and 145).
    return peak_rss_bytes() / 2**20


def summary_ms(seconds: list[float]) -> dict:
    """Median and interquartile range of durations, in milliseconds."""
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
    return {"median_ms": round(1000 * q[1], 2), "q1_ms": round(1000 * q[0], 2), "q3_ms": round(1000 * q[2], 2)}


def run_worker(module: str, spec: dict, cpu: int | None = None, timeout: float = 3600) -> dict:
    """Run ``python -m MODULE --worker JSON`` in a fresh single-threaded process (pinned to core ``cpu`` when given)
    and return the JSON object it prints on its last stdout line."""
    command = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"worker {module} {spec} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference else ""


#: Lightning precisions a benchmark can be asked for (``--precision``).
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")


def add_device_arguments(parser) -> None:
    """``--device`` (``cpu`` | ``cuda`` | ``cuda:N``) and ``--precision`` (Lightning's), shared by every benchmark."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS, help="Lightning's (default 32-true)")


def trainer_overrides(args) -> list[str]:
    """The CLI arguments that run a fit on ``args.device`` at ``args.precision`` (benchmarks that launch the CLI)."""
    if args.device.startswith("cuda"):
        index = args.device.partition(":")[2]
        devices = f"[{index}]" if index else "1"
        return ["--trainer.accelerator", "gpu", "--trainer.devices", devices, "--trainer.precision", args.precision]
    return ["--trainer.accelerator", "cpu", "--trainer.precision", args.precision]


def device_overrides(args) -> list[str]:
    """``trainer_overrides`` when ``--device`` / ``--precision`` are not the defaults, else none (so that runs made
    with the defaults keep their settings, and a benchmark's finished runs are found again)."""
    if args.device == "cpu" and args.precision == "32-true":
        return []
    return trainer_overrides(args)
