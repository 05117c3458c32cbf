"""W&B with no account: the CLI switches it to offline mode, and metrics, config and sample grids reach the run."""

from __future__ import annotations

import os

import pytest
from conftest import REPO

from lightning_ft.run import main


@pytest.fixture
def no_account(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from a `wandb login`
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    yield
    os.environ.pop("WANDB_MODE", None)


def test_wandb_runs_offline_and_receives_metrics_config_and_images(no_account, tmp_path, subject_dir):
    data = tmp_path / "data.yaml"
    data.write_text(
        f"data:\n  init_args:\n    instance_dir: {subject_dir}\n    num_class_images: 0\n    batch_size: 1\n"
        "    instance_prompt: a sks orange star on a gray background\n"  # the fixture's images have no captions
    )
    # The embedded subject's data config gives the prompts; data.yaml swaps its images for the fixture's.
    main(["fit", "--config", str(REPO / "experiments/dreambooth.yaml"),
          "--config", str(REPO / "configs/data/embedded_subject.yaml"),
          "--config", str(REPO / "configs/model/tiny_t2i.yaml"), "--config", str(data),
          "--config", str(REPO / "configs/logger/wandb.yaml"),
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_steps", "2",
          "--trainer.log_every_n_steps", "1", f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert os.environ["WANDB_MODE"] == "offline"
    import wandb

    wandb.finish()  # what the process's exit does: flush the run to disk
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    files = {p.relative_to(runs[0]).as_posix() for p in runs[0].rglob("*") if p.is_file()}
    assert any(f.endswith(".wandb") for f in files)  # the run log that `wandb sync` uploads
    assert any(f.startswith("files/media/images/samples") for f in files), sorted(files)
    text = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"train/loss" in text and b"lr" in text  # metrics and the config (hparams) are in the run
