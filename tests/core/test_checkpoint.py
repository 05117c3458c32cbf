"""Checkpoints hold only trainable weights, restore on top of the pretrained model and resume exactly."""

from __future__ import annotations

import lightning as L
import torch
from conftest import tiny_module
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ft.data import LimitedDataModule


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
    full = tiny_module(trainable="full")
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    data = LimitedDataModule(str(subject_dir), instance_prompt="a sks star", resolution=32, batch_size=2)
    try:
        trainer.fit(full, data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    except KeyError as error:
        assert "lacks" in str(error) and "trainable" in str(error)
    else:
        raise AssertionError("resuming a LoRA checkpoint into a full fine-tune must fail")
