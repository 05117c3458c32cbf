"""Framework overhead and fast defaults: lightning-ft's DreamBooth training step against a plain PyTorch loop on the
same model, data, batch and optimizer (``benchmarks/plain_loop.py``: diffusers' ``train_dreambooth.py`` math, which
encodes the images with the VAE and the prompts with the text encoder on every step, with torch's default AdamW;
identity checked by ``tests/benchmarks/test_plain_loop.py`` and ``tests/core/test_fast_defaults.py``), interleaved
step by step in one process. Two framework arms, each its own fit:

- ``same work``: the framework set to do exactly the plain loop's work (``SAME_WORK``: per-step encoding, torch's
  default AdamW): what the framework itself costs (goal: <= 1%);
- ``defaults``: the framework as a user gets it (cached latents and text embeddings, fused AdamW): how much faster
  it is than the plain loop (goal: >= 1.25x).

The framework arm is ``experiments/dreambooth.yaml``'s model and data (the main job's configuration without its
Bayesian layers: the plain loop is DreamBooth's math) run by a Lightning ``Trainer`` as the CLI runs it (CSV logger
every 10 steps, the CLI's progress bar, ``training_step``'s logging and non-finite check), without checkpointing or
the sample and export callbacks (the plain loop does neither). After every framework step a callback runs one plain
step, so both arms see the same machine state; a framework step is timed from the end of the previous plain step to
the end of its own update, so everything the framework does between updates (data fetching, hooks, logging, progress
bar) counts against it.

Peak memory is measured per arm in a separate process each (a process's high-water mark cannot be reset).

    python -m benchmarks.overhead                  # writes benchmarks/results/overhead.{md,csv}
    python -m benchmarks.overhead --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.loggers import CSVLogger

from benchmarks.perf import now, peak_mb, reset_peak, rss_mb, run_worker
from benchmarks.plain_loop import PRECISIONS, PlainDreamBooth
from benchmarks.step_cost import load_experiment
from benchmarks.tables import write_table
from lightning_ft.cli import StepsProgressBar
from lightning_ft.data import LimitedDataModule

BASELINE_MB = rss_mb()


class Interleave(L.Callback):
    """After each framework step, one plain step; both are timed (synchronized wall clock)."""

    def __init__(self, device: str, total_steps: int, plain: bool = True, precision: str = "32-true"):
        self.device, self.total_steps, self.run_plain, self.precision = device, total_steps, plain, precision
        self.framework, self.plain, self.mark, self.loop = [], [], None, None

    def on_train_start(self, trainer, module) -> None:
        if self.run_plain:  # the same data module's loader: the same dataset, sampler and collate
            loader = trainer.datamodule.train_dataloader()
            source = getattr(module, "source", module)  # LightningLoopOnly wraps the framework's module
            self.loop = PlainDreamBooth(source, loader, self.total_steps, precision=self.precision)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.mark is None:
            self.mark = now(self.device)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        t = now(self.device)
        self.framework.append(t - self.mark)
        if self.loop is not None:  # (an exception escaping here, StopIteration included, would derail the fit)
            self.loop.step()
            self.plain.append(now(self.device) - t)
        self.mark = now(self.device)


#: The framework's settings that make it do the plain loop's work: encode images and prompts every step, and
#: torch's default AdamW (the arm that measures the framework's own cost).
SAME_WORK = {"cache_text_embeddings": False, "cache_latents": False, "fused_adamw": False}


ARMS = {"same work": False, "defaults": True, "Lightning loop only": False}


class LightningLoopOnly(L.LightningModule):
    """The plain loop's loss and optimizer run by Lightning's loop, with no logger, logging or progress bar: what
    Lightning's automatic optimisation costs by itself (the rest of the ``same work`` overhead is lightning-ft's)."""

    def __init__(self, source, precision: str = "32-true"):
        super().__init__()
        self.source = source  # the framework's module: its denoiser trains, as the plain loop trains a copy
        self.plain = PlainDreamBooth(source, [], copy_denoiser=False, precision=precision)

    def training_step(self, batch, batch_idx):
        return self.plain.loss(batch)

    def configure_optimizers(self):
        return self.plain.optimizer


def build(args, defaults: bool = False):
    """The framework's module and data module; ``defaults=False``: set to do the plain loop's work (``SAME_WORK``)."""
    model, data = load_experiment("experiments/dreambooth.yaml")
    model = copy.deepcopy(model)
    if not defaults:
        model["init_args"].update(SAME_WORK)
    torch.manual_seed(0)
    module = instantiate_class((), model)
    datamodule = LimitedDataModule(**{**data, "batch_size": args.batch_size})
    return module, datamodule


def trainer_for(args, callback, tmp: str, steps: int, bare: bool = False) -> L.Trainer:
    """A Trainer as the CLI runs it (CSV logger, its progress bar); ``bare``: no logger and no progress bar."""
    return L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1, max_steps=steps,
        precision=args.precision, logger=False if bare else CSVLogger(tmp), log_every_n_steps=10,
        enable_checkpointing=False, enable_progress_bar=not bare, enable_model_summary=not bare,
        callbacks=[callback] if bare else [callback, StepsProgressBar()], limit_val_batches=0,
    )  # fmt: skip


def prepare_data(args, module, datamodule, tmp: str) -> None:
    """Set the data module up with the framework's module (it samples missing class images with it, or finds them
    cached), for the arms that train something else."""
    host = trainer_for(args, L.Callback(), tmp, 1)
    host.strategy.connect(module)
    datamodule.trainer = host
    datamodule.setup("fit")


def interleaved(args, defaults: bool, bare: bool = False) -> dict:
    """One fit of the framework arm with a plain step after each of its steps; medians, ratio and a bootstrap
    interval of the ratio over the pairs."""
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        module, datamodule = build(args, defaults)
        callback = Interleave(args.device, steps, precision=args.precision)
        if bare:  # the data module finds its class images through the framework's module: set it up with it
            prepare_data(args, module, datamodule, tmp)
            module = LightningLoopOnly(module, args.precision)
        trainer_for(args, callback, tmp, steps, bare).fit(module, datamodule)
    framework = np.array(callback.framework[args.warmup :])
    plain = np.array(callback.plain[args.warmup :])
    assert len(framework) == len(plain) == args.steps, (len(framework), len(plain))
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(plain), size=(2000, len(plain)))
    boot = np.median(framework[draws], axis=1) / np.median(plain[draws], axis=1)
    ratio = float(np.median(framework) / np.median(plain))
    return {
        "pairs": len(plain),
        "framework_median_ms": round(1000 * float(np.median(framework)), 2),
        "plain_median_ms": round(1000 * float(np.median(plain)), 2),
        "overhead_pct": round(100 * (ratio - 1), 2),
        "overhead_ci95_pct": " to ".join(f"{100 * (np.quantile(boot, q) - 1):.2f}" for q in (0.025, 0.975)),
        "speedup": f"{1 / ratio:.3f}x",
        "speedup_ci95": f"{1 / np.quantile(boot, 0.975):.3f}-{1 / np.quantile(boot, 0.025):.3f}x",
        "median_paired_difference_ms": round(1000 * float(np.median(framework - plain)), 2),
    }


def memory_worker(spec: dict) -> dict:
    """One arm alone in this process: the framework's Trainer, or the plain loop over the same data."""

    class Args:
        device, batch_size, precision = spec["device"], spec["batch_size"], spec["precision"]

    steps = spec["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        module, datamodule = build(Args, spec.get("defaults", False))
        reset_peak(Args.device)
        if spec["arm"] == "framework":
            trainer_for(Args, Interleave(Args.device, steps, plain=False), tmp, steps).fit(module, datamodule)
        else:
            prepare_data(Args, module, datamodule, tmp)
            module.to(Args.device)
            loop = PlainDreamBooth(module, datamodule.train_dataloader(), steps, copy_denoiser=False,
                                   precision=Args.precision)  # fmt: skip
            for _ in range(steps):
                loop.step()
    return {"peak_mb": round(peak_mb(Args.device) - (BASELINE_MB if Args.device == "cpu" else 0), 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS, help="Lightning's; the plain loop "
                        "runs under the same autocast (and a GradScaler for 16-mixed)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=300, help="timed step pairs per arm (after --warmup)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="instance images per batch (+ as many class images)")
    parser.add_argument("--memory-steps", type=int, default=20)
    parser.add_argument("--arms", nargs="*", default=None, choices=list(ARMS), help="arms to run (default: all)")
    parser.add_argument("--cpu", type=int, default=None, help="pin the memory workers to this core")
    parser.add_argument("--out", default="benchmarks/results/overhead")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(memory_worker(json.loads(args.worker))))
        return []

    rows = []
    for arm, defaults in ARMS.items():
        if args.arms and arm not in args.arms:
            continue
        batch = f"{args.batch_size} instance + {args.batch_size} class"
        row = {"arm": arm, "device": args.device, "precision": args.precision, "batch": batch}
        row.update(interleaved(args, defaults, bare=arm == "Lightning loop only"))
        if arm == "Lightning loop only":  # a decomposition of the first arm: its memory is that arm's
            print(row, flush=True)
            rows.append(row)
            continue
        for side in ("framework", "plain"):
            spec = {"arm": side, "defaults": defaults, "device": args.device, "precision": args.precision,
                    "batch_size": args.batch_size, "steps": args.memory_steps}  # fmt: skip
            row[f"{side}_peak_mb"] = run_worker("benchmarks.overhead", spec, cpu=args.cpu)["peak_mb"]
        print(row, flush=True)
        rows.append(row)
    columns = ["arm", "device", "precision", "batch", "pairs", "framework_median_ms", "plain_median_ms",
               "overhead_pct", "overhead_ci95_pct", "speedup", "speedup_ci95", "framework_peak_mb",
               "plain_peak_mb"]  # fmt: skip
    notes = [
        f"`experiments/dreambooth.yaml` (embedded model, 32x32, prior preservation), {args.steps} interleaved step "
        f"pairs per arm after {args.warmup} warm-up pairs, one process. `same work`: the framework encoding every "
        f"step with torch's default AdamW ({SAME_WORK}), as the plain loop does: overhead = median framework step / "
        "median plain step - 1, goal <= 1%. `defaults`: the framework's defaults (cached latents and text "
        "embeddings, fused AdamW): speedup = median plain step / median framework step, goal >= 1.25x. `Lightning loop "
        "only`: the plain loop's loss and optimizer in Lightning's loop with no logger, logging or progress bar (what "
        "Lightning costs by itself). The 95% "
        "intervals are bootstraps over the pairs (2,000 resamples). Peak: MiB above the process's floor after "
        f"imports, each arm alone in its own process for {args.memory_steps} steps (CPU: resident-set high-water; "
        "CUDA: max allocated).",
    ]
    write_table(rows, args.out, "Framework overhead and fast defaults: lightning-ft vs a plain PyTorch loop", columns,
                notes)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
