"""CorruptionStageMonitor with several prompts: each prompt's subject fidelity beside the pooled one, in its history
and its CSV; one prompt writes exactly the columns it always wrote."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from conftest import tiny_module, write_images
from lightning.pytorch.loggers import CSVLogger

from lightning_ft.callbacks import CorruptionStageMonitor
from lightning_ft.callbacks.corruption_monitor import CSV_COLUMNS, PER_PROMPT
from lightning_ft.data import LimitedDataModule
from lightning_ft.metrics import features, subject_fidelity

IDENTITY = "lightning_ft.embedded.backbones:identity"
PROMPTS = ["a sks star", "a sks star on a black background", "a red circle"]


def _fit(root, prompts):
    monitor = CorruptionStageMonitor(prompts=prompts, seeds=[0, 1], every_n_steps=0, steps=2, backbone=IDENTITY,
                                     levels=False, verbose=False)  # fmt: skip
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=CSVLogger(root, name="run", version=0),
                        callbacks=[monitor], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=root)  # fmt: skip
    data = LimitedDataModule(str(write_images(root / "subject", 3)), instance_prompt="a sks star", resolution=32,
                             batch_size=2, repeats=2)  # fmt: skip
    torch.manual_seed(0)
    module = tiny_module(lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(module, data)
    finally:
        torch.set_num_threads(threads)
    with (root / "run" / "version_0" / "corruption_stage.csv").open() as handle:
        return monitor, module, list(csv.DictReader(handle))


def test_several_prompts_are_scored_each_and_pooled(tmp_path):
    monitor, module, rows = _fit(tmp_path, PROMPTS)
    keys = [f"{PER_PROMPT}{p}" for p in PROMPTS]
    assert tuple(rows[0]) == (*CSV_COLUMNS, *keys)  # the usual columns first, then one per prompt, in order
    assert [int(r["step"]) for r in rows] == [0, 1]
    for row, point in zip(rows, monitor.history):
        per_prompt = [point[k] for k in keys]
        assert [float(row[k]) for k in keys] == pytest.approx(per_prompt)
        # Each prompt has as many samples: the pooled fidelity is the mean of the prompts'.
        assert point["fidelity"] == pytest.approx(sum(per_prompt) / 3, abs=1e-6)
    # The last point's per-prompt scores are those of each prompt's own samples (fixed seeds: drawn again here).
    module.eval()
    ref, _ = monitor.reference(32)
    for prompt, key in zip(PROMPTS, keys):
        images = module.generate(prompts=[prompt] * 2, seeds=[0, 1], steps=2)
        assert monitor.history[-1][key] == pytest.approx(subject_fidelity(features(images, monitor.backbone), ref),
                                                         abs=1e-5)  # fmt: skip
    # Per-prompt scores survive a state round trip, as the history does.
    state = monitor.state_dict()
    fresh = CorruptionStageMonitor(prompts=PROMPTS, backbone=IDENTITY)
    fresh.load_state_dict(state)
    assert all(key in fresh.history[-1] for key in keys)


def test_one_prompt_writes_the_usual_columns_only(tmp_path):
    monitor, _, rows = _fit(tmp_path, ["a sks star"])
    assert tuple(rows[0]) == CSV_COLUMNS
    assert not any(k.startswith(PER_PROMPT) for p in monitor.history for k in p)
