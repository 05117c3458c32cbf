"""ControlAdherenceMonitor with a fake module whose ``generate`` draws known images: the IoU curve it logs, the
convergence rule (a dip after passing resets it), the interval, its CSV, state and errors. No diffusion model."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ft.callbacks.control_monitor import ControlAdherenceMonitor, convergence_step
from lightning_ft.embedded import shapes
from lightning_ft.embedded.targets import ensure_target

PAIRS = 32
# step -> how many of the 32 pairs the fake model draws exactly on its control (the others: nothing drawn)
SCHEDULE = {0: 0, 2: 8, 4: 24, 6: 12, 8: 32, 10: 28}


class FakeControlModel(L.LightningModule):
    """Draws the control's silhouette in red on the prompt's background for the first ``SCHEDULE[step]`` pairs and
    the bare background for the rest, so pair i scores IoU 1 or 0 and the mean is known at every step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def training_step(self, batch, batch_idx):
        return (self.weight - batch[0].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def generate(self, prompts, seeds, controls, steps=None, guidance_scale=None):
        self.calls.append((self.trainer.global_step, list(prompts), list(seeds), controls.clone()))
        backgrounds = torch.tensor([shapes.BACKGROUNDS[p.split()[-2]] for p in prompts], dtype=torch.float32) / 255
        images = backgrounds[:, :, None, None].expand(len(prompts), 3, *controls.shape[-2:]).clone()
        drawn = SCHEDULE[self.trainer.global_step]
        mask = controls[:drawn].mean(1, keepdim=True) > 0.5
        images[:drawn] = torch.where(mask, torch.tensor([0.9, 0.1, 0.1])[:, None, None], images[:drawn])
        return images

    def round_trip(self, images):
        return images.clone()


class HeldoutData(L.LightningDataModule):
    def __init__(self, heldout_dir: str | None, resolution: int = 32):
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 1)), batch_size=4)


def fit(tmp_path, monitor, max_steps=10, heldout=True):
    folder = str(ensure_target("control") / "heldout") if heldout else None
    model = FakeControlModel()
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=[monitor], default_root_dir=tmp_path, logger=logger, accelerator="cpu",
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=HeldoutData(folder))
    return trainer, model


def test_convergence_rule():
    steps = [0, 50, 100, 150, 200, 250]
    assert convergence_step(steps, [0.2, 0.7, 0.5, 0.8, 0.9, 0.95], 0.6) == 150  # the dip at 100 resets it
    assert convergence_step(steps, [0.2, 0.7, 0.8, 0.8, 0.9, 0.95], 0.6) == 50
    assert convergence_step(steps, [0.2, 0.6, 0.6, 0.6, 0.6, 0.6], 0.6) == 50  # reaching the threshold counts
    assert convergence_step(steps, [0.2, 0.7, 0.8, 0.8, 0.9, 0.5], 0.6) is None  # below at the last evaluation
    assert convergence_step(steps, [0.1] * 6, 0.6) is None
    assert convergence_step([], [], 0.6) is None
    with pytest.raises(ValueError, match="steps"):
        convergence_step(steps, [0.1], 0.6)


def test_curve_convergence_and_interval(tmp_path):
    monitor = ControlAdherenceMonitor(every_n_steps=2, threshold=0.6, verbose=False)
    trainer, model = fit(tmp_path, monitor)
    steps = [p["step"] for p in monitor.history]
    assert steps == sorted(SCHEDULE)  # step 0, every 2 steps, the end (step 10, not measured twice)
    for point in monitor.history:
        drawn = SCHEDULE[point["step"]]
        assert point["ious"] == [1.0] * drawn + [0.0] * (PAIRS - drawn)  # the exact per-pair scores
        assert point["iou"] == pytest.approx(drawn / PAIRS) and point["pairs"] == PAIRS
        assert point["iou_low"] <= point["iou"] <= point["iou_high"]
        if 0 < drawn < PAIRS:  # 0/1 scores: about the normal approximation's interval
            half = 1.96 * math.sqrt(point["iou"] * (1 - point["iou"]) / PAIRS)
            assert point["iou_high"] - point["iou_low"] == pytest.approx(2 * half, rel=0.25)
        else:
            assert point["iou_low"] == point["iou_high"] == point["iou"]
    # 0.75 at step 4 passes 0.6, the dip to 0.375 at step 6 resets it: converged at 8
    assert monitor.convergence_step() == 8
    assert monitor.levels["ceiling"] > 0.99  # round trips are the renders here (the fake's round_trip copies)
    # the same held-out pairs, prompts and seeds at every evaluation
    heldout = ensure_target("control") / "heldout"
    captions = [json.loads(line)["caption"] for line in (heldout / "captions.jsonl").read_text().splitlines()]
    for _, prompts, seeds, controls in model.calls:
        assert prompts == captions[:PAIRS] and seeds == list(range(PAIRS))
        assert controls.shape == (PAIRS, 3, 32, 32) and 0 <= controls.min() and controls.max() <= 1
        assert torch.equal(controls, model.calls[0][3])
    assert trainer.callback_metrics["control/iou"] == pytest.approx(28 / 32)
    assert trainer.callback_metrics["control/converged_step"] == 8
    with open(tmp_path / "lightning_logs" / "version_0" / "control_adherence.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == steps
    assert [float(r["iou"]) for r in rows] == pytest.approx([SCHEDULE[s] / PAIRS for s in steps])
    assert {r["converged_step"] for r in rows} == {"8"} and {r["threshold"] for r in rows} == {"0.6"}
    assert "converged at step 8" in monitor.summary()
    names = [name for name, _, _ in monitor.card_metrics()]
    assert names == ["control adherence (IoU)", "control IoU ceiling", "control convergence step"]


def test_a_dip_at_the_end_means_not_converged(tmp_path):
    monitor = ControlAdherenceMonitor(every_n_steps=2, threshold=0.9, pairs=PAIRS, verbose=False)
    fit(tmp_path, monitor)
    assert monitor.history[-2]["iou"] == 1.0 and monitor.history[-1]["iou"] == 28 / 32
    assert monitor.convergence_step() is None
    assert "not converged" in monitor.summary()


def test_pairs_seeds_and_state(tmp_path):
    monitor = ControlAdherenceMonitor(every_n_steps=4, pairs=8, seeds=list(range(100, 108)), verbose=False)
    _, model = fit(tmp_path, monitor, max_steps=4)
    assert [len(c[1]) for c in model.calls] == [8, 8] and model.calls[0][2] == list(range(100, 108))
    restored = ControlAdherenceMonitor(every_n_steps=4, pairs=8, seeds=list(range(100, 108)))
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history and restored.levels == monitor.levels
    assert restored.convergence_step() == monitor.convergence_step()


def test_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="data.heldout_dir"):
        fit(tmp_path, ControlAdherenceMonitor(verbose=False), heldout=False)
    with pytest.raises(ValueError, match="pairs=64"):
        fit(tmp_path, ControlAdherenceMonitor(pairs=64, verbose=False))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "a red star"}) + "\n")
    with pytest.raises(ValueError, match=r"ControlAdherenceMonitor.heldout_dir: .* line 1 has no conditioning_image"):
        fit(tmp_path, ControlAdherenceMonitor(heldout_dir=str(broken), verbose=False))
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        fit(tmp_path, ControlAdherenceMonitor(heldout_dir=str(tmp_path), verbose=False))
    with pytest.raises(ValueError, match="seeds"):
        ControlAdherenceMonitor(pairs=4, seeds=[0, 1])
