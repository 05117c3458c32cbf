"""Fit the tiny model to 8 steps through the CLI, checkpointing every step; optionally resume from last.ckpt.

``python tests/distributed/resume_fit.py ROOT IMAGES [--resume]``; the final trainable weights go to ROOT/final.pt.
Run as a script so that a test can SIGKILL it mid-training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lightning_ft.run import main

REPO = Path(__file__).resolve().parents[2]


def run(root: str, images: str, resume: bool) -> None:
    args = [
        "fit", "--config", str(REPO / "experiments/dreambooth.yaml"),
        "--config", str(REPO / "configs/model/tiny_t2i.yaml"),
        # The experiment holds no data: the images and their prompt are given here (no held-out set to render).
        f"--data.instance_dir={images}", "--data.instance_prompt=a sks star",
        "--data.num_class_images=0", "--data.batch_size=2", "--data.repeats=4",
        "--trainer.max_steps=8", "--trainer.logger=false", f"--trainer.default_root_dir={root}",
        "--trainer.deterministic=true", "--model.condition_dropout=0.2", "--model.lr=1e-3", "--model.ema_decay=0.9",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root}/ckpt", "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=-1",
    ]  # fmt: skip
    if resume:
        args.append(f"--ckpt_path={root}/ckpt/last.ckpt")
    cli = main(args)
    module = cli.model
    state = {k: v.detach().clone() for k, v in module.state_dict().items() if k in module.trainable_state_keys()}
    torch.save({"state": state, "ema": module.ema.state_dict() if module.ema else None}, Path(root) / "final.pt")


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], "--resume" in sys.argv)
