"""The data options of a real run, through the CLI: aspect buckets, a mask folder, caption dropout and tag shuffling
train together, and a run resumed in its second epoch from a checkpoint ends bitwise equal to the unbroken run."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import REPO
from PIL import Image, ImageDraw

from lightning_ft.run import main

TINY = str(REPO / "configs/model/tiny_t2i.yaml")
DREAMBOOTH = str(REPO / "experiments/dreambooth.yaml")
SIZES = {"wide": (128, 64), "square": (96, 96), "tall": (64, 128)}
STEPS = 12  # 3 images x 4 repeats in batches of 2 of one bucket: 6 batches an epoch, so two epochs


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, (name, (w, h)) in enumerate(SIZES.items()):
        image = Image.new("RGB", (w, h), (120, 120, 120))
        ImageDraw.Draw(image).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(200, 60, 30))
        image.save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(f"sks, star {i}, gray background, centred")
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).rectangle((0, 0, w // 2, h), fill=255)  # the left half is trained
        mask.save(masks / f"{name}.png")
    return images, masks


def _args(root: Path, images: Path, masks: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", DREAMBOOTH, "--config", TINY,
        f"--data.instance_dir={images}", f"--data.mask_dir={masks}", "--data.num_class_images=0",
        "--data.resolution=64", "--data.aspect_buckets=true", "--data.bucket_step=16",
        "--data.caption_dropout=0.3", "--data.shuffle_tags=true", "--data.keep_tokens=1",
        "--data.batch_size=2", "--data.repeats=4", f"--trainer.max_steps={STEPS}",
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.deterministic=true", "--trainer.enable_progress_bar=false", "--model.lr=1e-3",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={root}/probe",
        "--trainer.callbacks.every_n_train_steps=4", "--trainer.callbacks.save_top_k=-1", *extra,
    ]  # fmt: skip


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=False)["state_dict"]


def test_buckets_masks_and_caption_options_train_and_resume_bitwise(tmp_path):
    images, masks = _folders(tmp_path)
    root = tmp_path / "run"
    cli = main(_args(root, images, masks))
    data = cli.datamodule
    assert cli.trainer.global_step == STEPS and cli.trainer.current_epoch >= 1  # the run crossed into epoch 1
    assert sorted({size for _, size in data.views}) == [(48, 80), (64, 64), (80, 48)]
    batch = next(iter(data.train_dataloader()))
    assert {"mask", "drop_condition"} <= batch.keys()
    assert batch["mask"].shape[-2:] == batch["pixel_values"].shape[-2:]

    # Resume from the probe of step 8 (epoch 1, mid-epoch) into another folder: it ends where the unbroken run did.
    probe = root / "probe" / "epoch=1-step=8.ckpt"
    assert probe.exists(), sorted(p.name for p in (root / "probe").iterdir())
    resumed_root = tmp_path / "resumed"
    main(_args(resumed_root, images, masks, f"--ckpt_path={probe}"))
    unbroken, resumed = _state(root / "probe" / f"epoch=1-step={STEPS}.ckpt"), _state(
        resumed_root / "probe" / f"epoch=1-step={STEPS}.ckpt"
    )
    assert unbroken.keys() == resumed.keys() and unbroken
    for key, value in unbroken.items():
        assert torch.equal(value, resumed[key]), key
    before = _state(probe)
    assert any(not torch.equal(before[k], v) for k, v in unbroken.items())  # steps 9-12 trained
