"""Mixed precision on CPU and a non-finite loss: bf16 trains close to fp32; a NaN stops training with the step named,
before the update, and the checkpoints already written stay loadable."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import tiny_module
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ft.data import LimitedDataModule


def _trainer(root, max_steps, precision="32-true", callbacks=()):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", precision=precision, logger=False,
                     callbacks=list(callbacks), enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=bool(callbacks), default_root_dir=root)  # fmt: skip


def _data(folder):
    return LimitedDataModule(str(folder), instance_prompt="a sks star", resolution=32, batch_size=2, repeats=4)


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_bf16_mixed_runs_on_cpu_with_a_finite_loss_close_to_fp32(subject_dir, tmp_path):
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        L.seed_everything(0)
        module = tiny_module(lr=1e-4)
        losses = _Losses()
        trainer = _trainer(tmp_path / precision, 3, precision)
        trainer.callbacks.append(losses)
        trainer.fit(module, _data(subject_dir))
        runs[precision] = losses.losses
    assert all(torch.isfinite(torch.tensor(runs["bf16-mixed"])))
    # Same seed, same batches, same noise: bf16 autocast changes only the arithmetic (bf16 keeps ~3 digits).
    assert runs["bf16-mixed"] == pytest.approx(runs["32-true"], rel=0.05)
    assert runs["bf16-mixed"] != runs["32-true"]  # autocast really was on


def test_a_non_finite_loss_stops_before_the_update_naming_the_step(subject_dir, tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = tiny_module(lr=1e-3)
    real = module.training_loss

    def poisoned(batch):
        loss, logs = real(batch)
        return (loss * float("nan"), logs) if module.global_step == 3 else (loss, logs)

    monkeypatch.setattr(module, "training_loss", poisoned)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    trainer = _trainer(tmp_path, 6, callbacks=[checkpoint])
    with pytest.raises(FloatingPointError, match="global step 3"):
        trainer.fit(module, _data(subject_dir))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3  # the last good step
    weights = {k: v for k, v in module.state_dict().items() if k in last["state_dict"]}
    # The NaN step made no update: the module's weights are still those of the last checkpoint.
    assert all(torch.equal(weights[k], v) for k, v in last["state_dict"].items())
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
