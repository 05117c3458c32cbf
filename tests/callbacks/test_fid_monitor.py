"""FIDMonitor: scores over training with their sample counts, in the logger and callback_metrics; cached reference."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import tiny_module, write_images
from lightning.pytorch.loggers import CSVLogger

from lightning_ft.callbacks import FIDMonitor
from lightning_ft.data import LimitedDataModule
from lightning_ft.metrics import FIDScorer

FEATURES = "lightning_ft.embedded.backbones:features"  # the tiny test model declares no backbone


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this module's fit; put back after it, so that later test modules run as they would alone
    root = tmp_path_factory.mktemp("fid")
    data_dir = write_images(root / "train", 3)
    reference = write_images(root / "reference", 12, seed=5)
    monitor = FIDMonitor(reference_dir=str(reference), num_samples=6, every_n_steps=2, steps=2, backbone=FEATURES)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=CSVLogger(root, name="run", version=0),
                        callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=root)  # fmt: skip
    data = LimitedDataModule(str(data_dir), instance_prompt="a red star", resolution=32, batch_size=2, repeats=4)
    torch.manual_seed(0)
    module = tiny_module(lr=1e-3)
    try:
        trainer.fit(module, data)
        yield root, reference, trainer, monitor, module
    finally:
        torch.set_num_threads(threads)


def test_scores_at_start_every_n_steps_and_end_with_their_counts(run):
    root, _, trainer, monitor, _ = run
    assert [p["step"] for p in monitor.history] == [0, 2, 4]
    with (root / "run" / "version_0" / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("fid/fid")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert all(float(r["fid/num_samples"]) == 6 and float(r["fid/num_reference"]) == 12 for r in rows)
    assert trainer.callback_metrics["fid/fid"].item() == pytest.approx(monitor.history[-1]["fid"])


def test_the_last_score_is_the_fid_of_the_final_models_samples(run):
    _, reference, _, monitor, module = run
    from lightning_ft.data.folder import list_images, load_image, to_tensor

    images = torch.stack([to_tensor(load_image(f), 32, True, False, None) for f in list_images(reference, "ref")])
    samples = module.generate(prompts=["a red star"] * 6, seeds=list(range(6)), steps=2)
    expected = FIDScorer(FEATURES).set_reference((images + 1) / 2).score(samples)["fid"]
    assert monitor.history[-1]["fid"] == pytest.approx(expected, rel=1e-6)


def test_reference_features_are_cached_and_reused(run, monkeypatch):
    _, reference, _, monitor, _ = run
    files = sorted(reference.glob("*.png"))
    first = monitor.reference_features(files, 32)
    monkeypatch.setattr("lightning_ft.callbacks.fid_monitor.load_image", lambda f: pytest.fail("not from cache"))
    assert torch.equal(monitor.reference_features(files, 32), first)


def test_too_few_samples_are_rejected():
    with pytest.raises(ValueError, match="num_samples=1"):
        FIDMonitor(num_samples=1)


def test_the_reference_is_the_monitors_folder_else_the_datas_heldout_dir(tmp_path):
    train = write_images(tmp_path / "train", 3)
    heldout = write_images(tmp_path / "heldout", 5, seed=2)
    own = write_images(tmp_path / "own", 4, seed=4)
    data = LimitedDataModule(str(train), instance_prompt="a red star", resolution=32, heldout_dir=str(heldout))
    trainer = SimpleNamespace(datamodule=data)
    monitor = FIDMonitor()
    assert monitor._reference_files(trainer) == sorted(heldout.glob("*.png"))
    assert monitor.reference_key == "data.heldout_dir"
    monitor = FIDMonitor(reference_dir=str(own))
    assert monitor._reference_files(trainer) == sorted(own.glob("*.png"))
    assert monitor.reference_key == "FIDMonitor.reference_dir"
    monitor.history = [{"step": 4, "fid": 1.0, "kid_x1000": 2.0, "num_samples": 6, "num_reference": 4}]
    assert "6 samples vs 4 reference images of FIDMonitor.reference_dir, step 4" in monitor.card_metrics()[0][2]


def test_without_heldout_images_the_training_images_are_scored_with_one_warning_naming_the_key(tmp_path):
    train = write_images(tmp_path / "train", 3)
    data = LimitedDataModule(str(train), instance_prompt="a red star", resolution=32)
    monitor = FIDMonitor()
    with pytest.warns(UserWarning, match="data.heldout_dir and FIDMonitor.reference_dir are unset") as caught:
        files = monitor._reference_files(SimpleNamespace(datamodule=data))
    assert len([w for w in caught if "FIDMonitor" in str(w.message)]) == 1
    assert files == sorted(train.glob("*.png")) and monitor.reference_key == "data.instance_dir"
    with pytest.raises(ValueError, match="set data.heldout_dir"):
        FIDMonitor()._reference_files(SimpleNamespace(datamodule=None))
