"""Fit the tiny model on aspect-bucketed data with N CPU processes (DDP, gloo) and record what each rank trained on.

Run as a script (Lightning's DDP launcher re-executes this file per extra rank): ``python
tests/distributed/bucket_fit.py DEVICES IMAGES_DIR OUT_PREFIX``. Each rank writes ``OUT_PREFIX.rank<r>.json``: per
step, the batch's pixel shape and the dataset indices of its items (read from the batch sampler's batches).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import yaml

from lightning_ft.data import LimitedDataModule
from lightning_ft.methods import DreamBooth

REPO = Path(__file__).resolve().parents[2]


class Recorder(L.Callback):
    def __init__(self, out: str):
        self.out, self.steps = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"epoch": trainer.current_epoch, "shape": list(batch["pixel_values"].shape),
                           "original": batch["original_size"].tolist()})  # fmt: skip

    def on_train_end(self, trainer, pl_module):
        sampler = trainer.train_dataloader.batch_sampler
        record = {"steps": self.steps, "rank": sampler.rank, "world": sampler.world,
                  "epoch0": sampler.batches(0), "epoch1": sampler.batches(1)}  # fmt: skip
        Path(f"{self.out}.rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main(devices: int, images: str, out: str) -> None:
    L.seed_everything(0)
    components = yaml.safe_load((REPO / "configs/model/tiny_t2i.yaml").read_text())["model"]["init_args"]["components"]
    module = DreamBooth(components=components, lr=1e-3, sample_steps=2)
    data = LimitedDataModule(images, instance_prompt="a sks star", resolution=64, aspect_buckets=True, bucket_step=16,
                             batch_size=2, repeats=4)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(Path(out).parent), callbacks=[Recorder(out)],
    )  # fmt: skip
    trainer.fit(module, data)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
