"""Start-up: wall time from launching the process to the end of its first training step, lightning-ft's CLI against
a plain training script on the same model, data and batch (``benchmarks/plain_loop.py``'s ``main``: torch, diffusers
and transformers only, as diffusers' ``train_dreambooth.py``).

The framework arm is ``python -m lightning_ft.run fit --config experiments/dreambooth.yaml --config
configs/data/embedded_subject.yaml`` with its CSV logger and progress bar, its callbacks replaced by a clock (the
experiment's monitors sample images before the first step: work the user asked for, not start-up). Both read the
same class images (sampled once beforehand, the data module's cache). Arms alternate over ``--rounds`` rounds, each
in a fresh single-threaded process; the table has the medians.

    python -m benchmarks.startup                   # writes benchmarks/results/startup.{md,csv}
    python -m benchmarks.startup --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import lightning as L

from benchmarks.launch import config_args
from benchmarks.perf import REPO, add_device_arguments, trainer_overrides
from benchmarks.tables import write_table

MARK = "lightning-ft-first-step-end"


class FirstStepClock(L.Callback):
    """Print the wall-clock time at which the first training step ended (and stop the fit there)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            print(json.dumps({MARK: time.time()}), flush=True)


def class_folder_and_data() -> tuple[str, dict, str]:
    """The folder of the experiment's class images (sampled now if missing, as a fit would), its data settings and
    its pretrained model's folder."""
    from lightning.pytorch.cli import instantiate_class

    from benchmarks.step_cost import load_experiment
    from lightning_ft.data import LimitedDataModule

    model, data = load_experiment("experiments/dreambooth.yaml")
    module = instantiate_class((), model)
    datamodule = LimitedDataModule(**data)
    host = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    host.strategy.connect(module)
    datamodule.trainer = host
    datamodule.setup("fit")
    return str(datamodule._generated_class_folder()), data, model["init_args"]["pretrained"]


#: The arms: the CLI, the plain script, and the plain script importing Lightning first (Lightning's own import cost,
#: which every Lightning program pays: it imports torchmetrics and torch._dynamo).
ARMS = {"framework": "lightning-ft CLI", "plain": "plain script", "plain+lightning": "plain script + import lightning"}


def command(arm: str, args, data: dict, class_dir: str, pretrained: str, root: str) -> list[str]:
    if arm.startswith("plain"):
        runner = ["-m", "benchmarks.plain_loop"]
        if arm == "plain+lightning":
            script = "import lightning, runpy; runpy.run_module('benchmarks.plain_loop', run_name='__main__')"
            runner = ["-c", script]
        return [sys.executable, *runner, "--pretrained", pretrained,
                "--instance-dir", data["instance_dir"], "--class-dir", class_dir,
                "--instance-prompt", data["instance_prompt"], "--class-prompt", data["class_prompt"],
                "--resolution", str(data["resolution"]), "--batch-size", str(data["batch_size"]),
                "--device", args.device]  # fmt: skip
    # With the data config its header names: the same images, prompts and class images as class_folder_and_data.
    return [sys.executable, "-m", "lightning_ft.run", "fit", *config_args("experiments/dreambooth.yaml"),
            "--trainer.max_steps", "1", *trainer_overrides(args),
            "--trainer.default_root_dir", root, "--trainer.logger.init_args.save_dir", root,
            "--trainer.callbacks", json.dumps([{"class_path": "benchmarks.startup.FirstStepClock"}])]  # fmt: skip


def time_to_first_step(cmd: list[str], cpu: int | None) -> float:
    """Seconds from launching ``cmd`` to the first-step time it prints (``MARK`` or the plain script's key)."""
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    start = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    for line in done.stdout.splitlines():
        if line.startswith("{") and (MARK in line or "first_step_end" in line):
            record = json.loads(line)
            return record.get(MARK, record.get("first_step_end")) - start
    raise RuntimeError(f"no first-step time in the output of {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cpu", type=int, default=None, help="pin every process to this core")
    parser.add_argument("--out", default="benchmarks/results/startup")
    args = parser.parse_args(argv)
    class_dir, data, pretrained = class_folder_and_data()
    times = {name: [] for name in ARMS.values()}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.rounds):
            for arm, name in ARMS.items():
                times[name].append(time_to_first_step(command(arm, args, data, class_dir, pretrained, root), args.cpu))
    reference = statistics.median(times["plain script"])
    rows = [
        {"arm": name, "device": args.device, "rounds": len(values),
         "median_s": round(statistics.median(values), 2), "min_s": round(min(values), 2),
         "max_s": round(max(values), 2), "vs_plain": f"{statistics.median(values) / reference:.2f}x"}
        for name, values in times.items()
    ]  # fmt: skip
    for row in rows:
        print(row, flush=True)
    notes = [
        f"Wall time from launching the process to the end of its first training step, {args.rounds} alternating "
        "rounds, each a fresh single-threaded process; `experiments/dreambooth.yaml`'s model and data (batch "
        f"{data['batch_size']} + {data['batch_size']} class images at {data['resolution']} px). Includes Python's "
        "imports, loading the model, reading the data and the first step. `plain script + import lightning`: the "
        "same script importing Lightning first (what importing Lightning itself costs). Goal: the CLI no slower than "
        "the plain script.",
    ]
    write_table(rows, args.out, "Start-up: lightning-ft CLI vs a plain training script", list(rows[0]), notes)
    return rows


if __name__ == "__main__":
    main()
