"""A real tiny fit through the CLI writes its report, its cost and a model card the Hub client reads; ``--report
false`` leaves the report out; W&B receives the figures."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO
from huggingface_hub import ModelCard
from PIL import Image
from report_fixtures import make_run

from lightning_ft.callbacks import RunReport
from lightning_ft.callbacks.run_report import log_to_wandb
from lightning_ft.report.run_folder import read_run
from lightning_ft.report.run_report import build_run_report
from lightning_ft.run import main


def _fit(tmp_path, subject_dir, *extra: str):
    data = tmp_path / "data.yaml"
    data.write_text(
        f"data:\n  init_args:\n    instance_dir: {subject_dir}\n    num_class_images: 2\n    batch_size: 1\n"
        "    instance_prompt: a sks orange star on a gray background\n"  # the fixture's images have no captions
    )
    root = tmp_path / "run"
    # The embedded subject's data config gives the prompts, grid rows and held-out images the report and the card
    # show; data.yaml swaps its training images for the fixture's.
    return main(["fit", "--config", str(REPO / "experiments/dreambooth_bnn.yaml"),
                 "--config", str(REPO / "configs/data/embedded_subject.yaml"),
                 "--config", str(REPO / "configs/model/tiny_t2i.yaml"), "--config", str(data),
                 "--model.sample_steps", "2", "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2",
                 "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 *extra])  # fmt: skip


def test_a_fit_writes_its_report_cost_and_model_card(tmp_path, subject_dir):
    cli = _fit(tmp_path, subject_dir)
    folder = tmp_path / "run" / "lightning_logs" / "version_0"
    assert sum(isinstance(c, RunReport) for c in cli.trainer.callbacks) == 1, "the CLI adds one to every fit"
    cost = json.loads((folder / "run_cost.json").read_text())
    assert cost["status"] == "finished" and cost["steps"] == 4 and cost["wall_seconds"] > 0
    assert cost["peak_memory_bytes"] > 0 and cost["peak_memory_kind"] == "process_peak_rss"
    html = (folder / "report.html").read_text()
    assert {p.stem for p in (folder / "report").glob("*.png")} == {"corruption_stage", "samples", "loss"}
    monitor = next(c for c in cli.trainer.callbacks if type(c).__name__ == "CorruptionStageMonitor")
    assert monitor.report.summary() in html, "the page shows the verdict the monitor printed"
    assert "Training loss" in html and "What the run cost" in html and "no FIDMonitor" in html

    card = ModelCard.load(folder / "export" / "README.md")
    assert card.data.instance_prompt == "a sks orange star on a gray background"
    assert card.data.library_name == "diffusers" and "bayesian-fine-tuning" in card.data.tags
    assert card.data.license == "other" and card.data.base_model is None  # built from component configs
    urls = [w["output"]["url"] for w in card.data.widget]
    assert len(urls) == 4 and all(Image.open(folder / "export" / url).size == (256, 256) for url in urls)
    assert "3 instance images" in card.text and "| `kl_weight` | `0` |" in card.text
    assert "subject fidelity" in card.text and monitor.report.summary() in card.text


def test_report_false_leaves_the_report_out(tmp_path, subject_dir):
    cli = _fit(tmp_path, subject_dir, "--report", "false", "--trainer.max_steps", "1")
    folder = tmp_path / "run" / "lightning_logs" / "version_0"
    assert not any(isinstance(c, RunReport) for c in cli.trainer.callbacks)
    assert not (folder / "report.html").exists() and not (folder / "run_cost.json").exists()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    import wandb

    wandb.finish()


def test_figures_go_to_wandb(tmp_path, offline_wandb):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    built = build_run_report(read_run(make_run(tmp_path, fid=[50.0, 40.0])))
    logger = WandbLogger(project="lightning-ft-test", save_dir=str(tmp_path), offline=True)
    trainer = SimpleNamespace(loggers=[CSVLogger(str(tmp_path / "csv")), logger], global_step=60)
    keys = log_to_wandb(trainer, built)
    assert keys == [f"report/{name}" for name in ("corruption_stage", "samples", "loss", "fid")]
    assert logger.experiment.summary["report/verdict"] == "memorising"
    run_dir = logger.experiment.dir
    import wandb

    wandb.finish()
    media = [p.relative_to(run_dir).as_posix() for p in _files(run_dir) if "media/images/report" in p.as_posix()]
    assert {m.split("/")[-1].rsplit("_", 2)[0] for m in media} == {"corruption_stage", "samples", "loss", "fid"}


def _files(folder):
    return [p for p in Path(folder).rglob("*") if p.is_file()]
