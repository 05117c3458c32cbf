"""Checkpoints hold only trainable weights, restore on top of the pretrained model and resume exactly."""

from __future__ import annotations

import errno
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_module
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ft.core.checkpoint_io import AtomicCheckpointIO
from lightning_ft.data import LimitedDataModule
from lightning_ft.methods import BayesianFineTuning


def _fit(module, data_dir, root, max_steps, ckpt_path=None, every=2):
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1, save_last=True)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        default_root_dir=root,
        deterministic=True,
    )
    data = LimitedDataModule(str(data_dir), instance_prompt="a sks star", resolution=32, batch_size=2, repeats=4)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def test_lora_checkpoint_holds_only_lora_weights_and_restores_on_pretrained(subject_dir, tmp_path):
    torch.manual_seed(0)
    module = tiny_module(trainable="lora", lr=1e-2)
    _fit(module, subject_dir, tmp_path, max_steps=2)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all("lora" in k for k in state)
    assert len(state) == sum(1 for p in module.parameters() if p.requires_grad)

    torch.manual_seed(0)
    fresh = tiny_module(trainable="lora", lr=1e-2)  # same pretrained (seeded) base, LoRA re-initialised
    fresh.load_state_dict(state, strict=False)
    for (name, a), b in zip(module.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


class _CaptureOptimizerAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        state = trainer.optimizers[0].state_dict()["state"]
        self.exp_avg = {k: v["exp_avg"].clone() for k, v in state.items()}
        self.step = trainer.global_step


class _CaptureOptimizerAtFirstBatch(L.Callback):
    """The optimizer as the first resumed step uses it (after every on_train_start, the module's included)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "lr"):
            optimizer, schedule = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
            self.lr, self.betas = optimizer.param_groups[0]["lr"], tuple(optimizer.param_groups[0]["betas"])
            self.base_lrs, self.exp_avg = list(schedule.base_lrs), dict(optimizer.state)


def test_resume_continues_step_counter_and_optimizer_state(subject_dir, tmp_path):
    torch.manual_seed(0)
    first = tiny_module(lr=1e-3)
    _fit(first, subject_dir, tmp_path / "b", max_steps=2)
    ckpt = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    saved = ckpt["optimizer_states"][0]["state"]
    assert saved, "optimizer moments are saved"

    torch.manual_seed(123)  # a different init: everything that matters must come from the checkpoint
    resumed = tiny_module(lr=1e-3)
    capture = _CaptureOptimizerAtStart()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, callbacks=[capture, checkpoint], enable_progress_bar=False
    )
    data = LimitedDataModule(str(subject_dir), instance_prompt="a sks star", resolution=32, batch_size=2, repeats=4)
    trainer.fit(resumed, data, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt")
    assert capture.step == 2 and trainer.global_step == 4
    assert set(capture.exp_avg) == set(saved)
    for key, value in saved.items():
        assert torch.equal(capture.exp_avg[key], value["exp_avg"])
    trained_at_2 = {k: v for k, v in ckpt["state_dict"].items()}
    assert any(not torch.equal(trained_at_2[k], v) for k, v in resumed.state_dict().items() if k in trained_at_2)


def test_loading_a_checkpoint_of_another_trainable_set_fails_clearly(subject_dir, tmp_path):
    torch.manual_seed(0)
    _fit(tiny_module(trainable="lora"), subject_dir, tmp_path, max_steps=1, every=1)
    data = LimitedDataModule(str(subject_dir), instance_prompt="a sks star", resolution=32, batch_size=2)
    for module, named in (
        (tiny_module(trainable="full"), ("'lora'", "'full'")),
        (tiny_module(trainable="lora", lora_rank=8), ("lora_rank: 4 in the checkpoint, 8 now", "another shape")),
        (tiny_module(BayesianFineTuning, trainable="lora"), ("dreambooth.DreamBooth", "bnn.BayesianFineTuning")),
    ):
        trainer = L.Trainer(
            max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False
        )
        with pytest.raises(ValueError) as error:
            trainer.fit(module, data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
        for text in named:
            assert text in str(error.value)
        assert trainer.global_step == 0


def test_resume_applies_the_new_learning_rate_over_the_restored_optimizer(subject_dir, tmp_path):
    torch.manual_seed(0)
    _fit(tiny_module(lr=1e-4, lr_scheduler="linear"), subject_dir, tmp_path / "a", max_steps=2)
    capture = _CaptureOptimizerAtFirstBatch()
    resumed = tiny_module(lr=1e-3, lr_scheduler="linear", betas=(0.8, 0.99))
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, callbacks=[capture], enable_progress_bar=False,
                        enable_checkpointing=False)  # fmt: skip
    data = LimitedDataModule(str(subject_dir), instance_prompt="a sks star", resolution=32, batch_size=2, repeats=4)
    trainer.fit(resumed, data, ckpt_path=tmp_path / "a" / "ckpt" / "last.ckpt")
    # Linear decay over this run's 4 steps, at the resumed step 2: half of the new base lr (the old run's 1e-4
    # over 2 steps would give 0 here).
    assert capture.lr == pytest.approx(1e-3 * 2 / 4) and capture.base_lrs == [1e-3]
    assert capture.betas == (0.8, 0.99)
    assert capture.exp_avg, "the optimizer state itself is still the checkpoint's"


def test_failed_checkpoint_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)

    def disk_full(self, checkpoint, path, storage_options=None):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(target, weights_only=True) == {"step": 1}
