"""What a fit cost, measured while it runs: wall time, optimizer steps, steps per second and peak memory.

``CostMeter.start`` at the start of the fit and ``CostMeter.stop`` at its end give a record that is saved as
``run_cost.json`` in the run folder, so that a report made later from the folder shows it too. What the numbers
measure (``describe`` says the same in words):

- ``wall_seconds``: wall-clock time from the callbacks' ``setup`` of ``fit`` to its end: training, the monitors'
  sampling, checkpoints, the export (the data module's setup comes before, so sampling missing class images is not
  counted);
- ``steps``: optimizer steps taken in this fit (a resumed fit counts from the step it resumed at);
- ``steps_per_second``: ``steps / wall_seconds``, so also everything included, not the training step alone;
- ``precision``: the precision Lightning ran (``trainer.precision`` once its accelerator connector resolved the
  config's: ``16-mixed`` asked on a CPU runs as ``bf16-mixed``); ``config.yaml`` keeps what was asked;
- ``status``: ``finished``, ``failed`` or ``interrupted``; an interrupted fit also has ``signal`` and ``checkpoint``
  (the ``last.ckpt`` that ``--ckpt_path last`` resumes, or null when none was written);
- ``peak_memory_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` (tensors allocated by PyTorch on the device,
  peak since the fit started; the caching allocator reserves more); else the peak resident set size of the process
  (``peak_rss_bytes``: Linux's ``VmHWM``), which counts the whole process since it started, not the fit alone. On
  several ranks, rank 0's.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

COST_FILE = "run_cost.json"
#: Lightning's short precision names and the names it runs them under (lightning.fabric.connector's conversion).
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def precision_name(value) -> str:
    """A Trainer's ``precision`` argument under Lightning's full name (None: its default, ``32-true``)."""
    text = "32-true" if value is None else str(value)
    return PRECISION_ALIASES.get(text, text)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own memory so far.

    On Linux, ``VmHWM`` of ``/proc/self/status``: the high-water mark of this program's address space, which starts
    afresh at ``exec``. Not ``getrusage``'s ``ru_maxrss``, which Linux carries over from the parent at ``fork`` and
    keeps across ``exec``: a program started by a large process (a benchmark that has trained in-process, a
    notebook) would report its parent's size. Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class CostMeter:
    """Measures one fit; ``device`` is the module's device at the start (``cuda`` selects the CUDA counter)."""

    def __init__(self):
        self.t0: float | None = None
        self.start_step = 0
        self.cuda_device = None

    def start(self, step: int, device=None) -> None:
        self.t0, self.start_step = time.perf_counter(), int(step)
        self.cuda_device = None
        if device is not None and getattr(device, "type", str(device)) == "cuda":
            import torch

            self.cuda_device = device
            torch.cuda.reset_peak_memory_stats(device)

    def stop(self, step: int, status: str = "finished") -> dict:
        if self.t0 is None:
            raise RuntimeError("CostMeter.stop before start")
        wall = time.perf_counter() - self.t0
        steps = max(0, int(step) - self.start_step)
        if self.cuda_device is not None:
            import torch

            peak, kind = int(torch.cuda.max_memory_allocated(self.cuda_device)), "cuda_max_memory_allocated"
        else:
            peak, kind = peak_rss_bytes(), "process_peak_rss"
        return {
            "status": status,
            "wall_seconds": round(wall, 3),
            "steps": steps,
            "start_step": self.start_step,
            "end_step": int(step),
            "steps_per_second": round(steps / wall, 4) if wall > 0 else None,
            "peak_memory_bytes": peak,
            "peak_memory_kind": kind,
            "device": str(self.cuda_device) if self.cuda_device is not None else "cpu",
        }


def write_cost(path: Path, record: dict) -> None:
    from lightning_ft.report.files import write_atomic

    write_atomic(path, json.dumps(record, indent=2) + "\n")


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 90:
        return f"{s:.1f} s"
    minutes, seconds = divmod(s, 60)
    if minutes < 90:
        return f"{int(minutes)} min {seconds:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


MEMORY_KINDS = {
    "cuda_max_memory_allocated": "peak GPU memory allocated by PyTorch tensors during the fit "
    "(torch.cuda.max_memory_allocated; the caching allocator reserves more)",
    "process_peak_rss": "peak resident memory of the whole process since it started (VmHWM on Linux), "
    "not of the fit alone",
}


def describe(record: dict, requested_precision: str | None = None) -> list[tuple[str, str, str]]:
    """(what, value, what it measures) rows for the page; ``requested_precision``: what the config asks
    (``precision_name`` of its ``trainer.precision``; None: unknown), named beside what ran when they differ."""
    resumed = f", from step {record['start_step']}" if record.get("start_step") else ""
    status = record.get("status", "finished")
    rows = []
    if record.get("precision"):
        ran = record["precision"]
        differs = requested_precision is not None and requested_precision != ran
        rows.append(("precision", ran, "what Lightning ran (trainer.precision)" + (
            f"; config.yaml asks {requested_precision}, which Lightning replaced on this accelerator" if differs
            else "")))  # fmt: skip
    return rows + [
        ("wall time", human_seconds(record.get("wall_seconds")),
         "from the trainer's setup to the end of fit: training, the monitors' sampling, checkpoints, the export "
         "(not the data module's setup, which samples missing class images)"
         + ("" if status == "finished" else f" (the fit {status})")),
        ("optimizer steps", f"{record.get('steps', '-')}", f"taken in this fit{resumed}"),
        ("steps/s", f"{record['steps_per_second']:.2f}" if record.get("steps_per_second") else "-",
         "optimizer steps / wall time: everything above included, not the training step alone"),
        ("peak memory", human_bytes(record.get("peak_memory_bytes")),
         MEMORY_KINDS.get(record.get("peak_memory_kind"), "as recorded")),
    ]  # fmt: skip
