"""Write the notebooks of this folder from the cells below (stored without outputs): python notebooks/make_notebooks.py

Editing the cells here and regenerating keeps the notebooks diff-able; tests/test_notebooks.py executes each one.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Run from the repository root, where the experiment files are.
REPO = Path.cwd() if (Path.cwd() / "experiments").exists() else Path.cwd().parent
os.chdir(REPO)
# The test suite sets LIGHTNING_FT_NOTEBOOK_QUICK=1 to run every notebook in seconds; unset, they run for real.
QUICK = os.environ.get("LIGHTNING_FT_NOTEBOOK_QUICK") == "1"
# Lightning's rich progress bar wraps the notebook's output stream, which recurses with the tqdm bars of diffusers'
# save_pretrained; the tqdm bar works in notebooks.
PROGRESS = "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"'''

QUICKSTART = [
    new_markdown_cell("""# 01 Quickstart: fine-tune on the embedded subject

The README's main job from Python: BNN DreamBooth (`experiments/dreambooth_bnn.yaml`) on the embedded few-shot subject
(`configs/data/embedded_subject.yaml`: 5 images of an orange star with blue stripes, bound to the token `sks`), with the
corruption-stage monitor. Then we look at samples and at the monitor's curves. About 2 minutes on 2 CPU cores
(seconds with `QUICK`)."""),
    new_code_cell(SETUP),
    new_code_cell("""from lightning_ft.run import main

steps = 10 if QUICK else 300
root = "runs/notebook_quickstart"
cli = main([
    # The experiment holds the method; the data config, the subject's images, prompts and held-out renders.
    "fit", "--config", "experiments/dreambooth_bnn.yaml", "--config", "configs/data/embedded_subject.yaml", PROGRESS,
    f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
    *(["--data.num_class_images=4", "--model.sample_steps=5"] if QUICK else []),
])
log_dir = Path(cli.trainer.log_dir)
print("logs in", log_dir)"""),
    new_markdown_cell(
        "Samples of the fine-tuned model (EMA / mean weights), on the training background and on new ones:"
    ),
    new_code_cell("""import matplotlib.pyplot as plt

from lightning_ft.embedded.targets import SUBJECT_EVAL_PROMPTS

module = cli.model
images = module.generate(prompts=[p for p in SUBJECT_EVAL_PROMPTS for _ in range(4)], seeds=list(range(4)) * 3)
figure, axes = plt.subplots(3, 4, figsize=(6, 4.5))
for axis, image in zip(axes.flat, images):
    axis.imshow(image.permute(1, 2, 0).numpy())
    axis.set_axis_off()
for row, prompt in zip(axes[:, 0], SUBJECT_EVAL_PROMPTS):
    row.set_title(prompt, fontsize=7, loc="left")
plt.tight_layout()"""),
    new_markdown_cell("""The corruption-stage monitor's curves (`corruption_stage.csv`): subject identity to the
instance images, read against its two levels (the class prior: what the pretrained model drew for the class prompt;
the ceiling: what a perfect copy scores through the autoencoder), the high-frequency corruption score,
memorisation, and the stage verdict (see `lightning_ft/report/stage_rules.py`)."""),
    new_code_cell("""import csv

with open(log_dir / "corruption_stage.csv") as handle:
    rows = list(csv.DictReader(handle))
steps_ = [int(r["step"]) for r in rows]
figure, axes = plt.subplots(1, 3, figsize=(12, 3))
for axis, key in zip(axes, ("fidelity", "score", "memorisation")):
    axis.plot(steps_, [float(r[key]) for r in rows], marker="o")
    axis.set_title(key)
    axis.set_xlabel("step")
for level, style in (("class_prior", ":"), ("ceiling", "--")):
    axes[0].axhline(float(rows[0][level]), color="gray", linestyle=style, label=level)
axes[0].legend()
print("verdict:", rows[-1]["stage"], "| progress from class prior to ceiling:", rows[-1]["progress"])
assert len(rows) >= 2 and all(-1 <= float(r["fidelity"]) <= 1 for r in rows)"""),
    new_markdown_cell("""The export is a plain diffusers folder: load it without lightning-ft."""),
    new_code_cell("""from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(log_dir / "export")
print(type(pipe).__name__, sum(p.numel() for p in pipe.unet.parameters()), "UNet parameters (the base's count)")"""),
]

NEW_METHOD = [
    new_markdown_cell("""# 02 Write a new method by subclassing `DiffusionBase`

A complete small method: **timestep curriculum DreamBooth**. Early in training it draws timesteps from the noisy end
(where layout and colour are decided), and it moves to uniform timesteps over `curriculum_steps` steps. Everything
else (components, EMA, prior preservation, checkpoints, sampling, export) comes from the base classes; the method is
the two hooks below."""),
    new_code_cell(SETUP),
    new_code_cell('''import torch

from lightning_ft.methods import DreamBooth


class CurriculumDreamBooth(DreamBooth):
    """DreamBooth whose timesteps move from the noisy end to uniform over ``curriculum_steps`` steps.

    Args:
        curriculum_steps: steps until the timestep distribution is uniform (default 200).
        start_power: p(t) ~ (t + 1) ** start_power at step 0 (default 2.0).
        **kwargs: see DreamBooth and DiffusionBase.
    """

    def __init__(self, *args, curriculum_steps: int = 200, start_power: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)

    def power_at(self, step: int) -> float:
        progress = min(1.0, step / max(1, self.hparams.curriculum_steps))
        return (1.0 - progress) * self.hparams.start_power

    def timesteps_with_power(self, n: int, power: float) -> torch.Tensor:
        T = self.noise_process.num_train_timesteps
        weights = (torch.arange(T, dtype=torch.float64) + 1) ** power
        return torch.multinomial(weights / weights.sum(), n, replacement=True).to(self.device)

    def sample_timesteps(self, n: int) -> torch.Tensor:  # the hook DiffusionBase calls for every batch
        return self.timesteps_with_power(n, self.power_at(self.global_step))

    def training_loss(self, batch):
        loss, logs = super().training_loss(batch)
        logs["curriculum_power"] = torch.tensor(self.power_at(self.global_step))
        return loss, logs'''),
    new_markdown_cell("""Check the hook before training: at step 0 the draws lean to the noisy end, once the
curriculum is over they are uniform (mean ~T/2)."""),
    new_code_cell("""from lightning_ft.embedded import asset_path

module = CurriculumDreamBooth(pretrained=str(asset_path("shapes-t2i")), lr=2e-5, curriculum_steps=20, sample_steps=10)
early = module.timesteps_with_power(4000, module.power_at(0)).float().mean().item()
late = module.timesteps_with_power(4000, module.power_at(20)).float().mean().item()
print(f"mean timestep at step 0: {early:.0f}, after the curriculum: {late:.0f}")
assert early > 600 and 450 < late < 550"""),
    new_markdown_cell("""Train it with a plain Lightning `Trainer` on the embedded subject (the CLI takes it just as
well: `--model.class_path my_module.CurriculumDreamBooth`)."""),
    new_code_cell("""import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from lightning_ft.data import LimitedDataModule
from lightning_ft.embedded.targets import SUBJECT_PROMPT, ensure_target

# Each training image is captioned by the .txt file beside it (the subject on gray or on black).
data = LimitedDataModule(str(ensure_target("subject") / "train"), resolution=32, batch_size=4, repeats=50)
trainer = L.Trainer(max_steps=6 if QUICK else 100, accelerator="cpu", logger=CSVLogger("runs/notebook_new_method"),
                    enable_checkpointing=False, log_every_n_steps=2, callbacks=[TQDMProgressBar()])
trainer.fit(module, data)
print("final loss", float(trainer.callback_metrics["train/loss"]))"""),
    new_code_cell("""folder = module.save_pretrained("runs/notebook_new_method/export")
images = module.generate(prompts=[SUBJECT_PROMPT] * 4, seeds=[0, 1, 2, 3])
print("exported to", folder, "; samples", tuple(images.shape))"""),
]

COMPARE = [
    new_markdown_cell("""# 03 Compare runs from their logs

Every run writes `metrics.csv` (CSV logger) and, with the monitors, `corruption_stage.csv`. This notebook reads the
corruption-stage benchmark's runs when they exist (`python -m benchmarks.corruption_stage`) and otherwise makes two
short runs (DreamBooth and BNN DreamBooth) to compare."""),
    new_code_cell(SETUP),
    new_code_cell("""import csv

from lightning_ft.run import main


def runs_of(root: Path) -> dict[str, list[Path]]:
    found = {}
    for method in ("dreambooth", "dreambooth_bnn"):
        found[method] = sorted((root / method).glob("seed*/lightning_logs/version_*"))
    return found


bench = REPO / "runs" / "bench_corruption" / "released_steps300"  # python -m benchmarks.corruption_stage
runs = runs_of(bench) if not QUICK else {}
if not runs or not all(runs.values()):
    root = REPO / "runs" / "notebook_compare"
    for method in ("dreambooth", "dreambooth_bnn"):
        out = root / method / "seed0"
        main(["fit", "--config", f"experiments/{method}.yaml", "--config", "configs/data/embedded_subject.yaml",
              PROGRESS, f"--trainer.max_steps={6 if QUICK else 200}",
              f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
              "--data.num_class_images=4", "--model.sample_steps=5"])
    runs = runs_of(root)
print({k: len(v) for k, v in runs.items()})"""),
    new_code_cell("""import matplotlib.pyplot as plt


def read(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


figure, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for colour, (method, dirs) in zip(("C0", "C1"), runs.items()):
    for i, run in enumerate(dirs):
        label = method if i == 0 else None
        losses = [r for r in read(run / "metrics.csv") if r.get("train/loss")]
        axes[0].plot([int(r["step"]) for r in losses], [float(r["train/loss"]) for r in losses], color=colour,
                     alpha=0.7, label=label)
        curve = read(run / "corruption_stage.csv")
        axes[1].plot([int(r["step"]) for r in curve], [float(r["fidelity"]) for r in curve], color=colour, label=label)
        axes[2].plot([int(r["step"]) for r in curve], [float(r["score"]) for r in curve], color=colour, label=label)
for axis, title in zip(axes, ("training loss", "subject fidelity", "corruption score")):
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.legend()
plt.tight_layout()"""),
    new_code_cell("""summary = []
for method, dirs in runs.items():
    finals = [float(read(run / "corruption_stage.csv")[-1]["fidelity"]) for run in dirs]
    summary.append((method, len(dirs), sum(finals) / len(finals)))
for method, n, fidelity in summary:
    print(f"{method:16s} runs={n}  mean final fidelity={fidelity:.3f}")"""),
]


def main() -> None:
    for name, cells in (("01_quickstart", QUICKSTART), ("02_new_method", NEW_METHOD), ("03_compare_runs", COMPARE)):
        notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                      "language": "python"}})  # fmt: skip
        nbformat.write(notebook, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
