"""Control images for ControlNet training: paired with the training images by name or by the captions file's
``conditioning_image`` field, every mismatch named in one error, cropped and flipped with their image, and a fit
through the CLI that exports a ControlNet pipeline and draws control | samples grids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_module, write_pairs
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image

from lightning_ft.data import LimitedDataModule
from lightning_ft.run import main


def _pairs(root, names=("a", "b", "c"), size=(40, 32)):
    return write_pairs(root, "controls", names, size)


def _data(images, **kwargs) -> LimitedDataModule:
    return LimitedDataModule(instance_dir=str(images), instance_prompt="a star", resolution=32, **kwargs)


def test_controls_pair_by_name_and_follow_their_images_crop_and_flip(tmp_path):
    images, controls = _pairs(tmp_path)
    (controls / "c.jpg").unlink()
    Image.open(images / "c.png").save(controls / "c.png")  # lossless: the control equals its image
    data = _data(images, control_dir=str(controls), center_crop=False, random_flip=True, repeats=8)
    data.setup("fit")
    for index in range(len(data.dataset)):
        item = data.dataset[index]
        # Each control is its image: the same crop and flip give the same pixels, in [0, 1] instead of [-1, 1].
        torch.testing.assert_close(item["control_values"], (item["pixel_values"] + 1) / 2, rtol=0, atol=1e-6)
    batch = next(iter(data.train_dataloader()))
    assert batch["control_values"].shape == batch["pixel_values"].shape


def test_every_mismatch_is_named_in_one_error(tmp_path):
    images, controls = _pairs(tmp_path)
    (controls / "b.png").unlink()
    Image.new("RGB", (40, 32)).save(controls / "stray.png")
    with pytest.raises(ValueError, match=r"data.control_dir.*1 images have no control image: .*b.png.*1 controls have "
                                         r"no image of the same name \(stem\): .*stray.png"):  # fmt: skip
        _data(images, control_dir=str(controls)).check_inputs()
    (controls / "stray.png").unlink()
    Image.new("RGB", (40, 32)).save(controls / "b.png")
    Image.new("RGB", (32, 32)).save(controls / "a.png")  # another aspect ratio than its 40x32 image
    with pytest.raises(ValueError, match=r"another aspect ratio.*a.png' is 32x32 but its image .* is 40x32"):
        _data(images, control_dir=str(controls)).check_inputs()
    Image.new("RGB", (80, 64), (255, 0, 0)).save(controls / "a.png")  # same aspect, twice the size: resized
    data = _data(images, control_dir=str(controls))
    data.check_inputs()
    assert data.controls[0].size == (40, 32) and data.controls[0].getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_the_captions_files_conditioning_image_field_gives_the_controls(tmp_path, suffix):
    images, controls = _pairs(tmp_path)
    rows = [("a.png", "a red star", "../controls/a.png"), ("b.png", "a blue star", "../controls/b.png"),
            ("c.png", "a green star", "../controls/c.jpg")]  # fmt: skip
    captions = images / f"captions.{suffix}"
    if suffix == "jsonl":
        captions.write_text("".join(json.dumps({"file": f, "caption": c, "conditioning_image": g}) + "\n"
                                    for f, c, g in rows))  # fmt: skip
    else:
        captions.write_text("file,caption,conditioning_image\n" + "".join(f"{f},{c},{g}\n" for f, c, g in rows))
    data = _data(images, captions_file=str(captions))
    data.check_inputs()
    assert data._instances[1] == ["a red star", "a blue star", "a green star"]
    assert len(data.controls) == 3
    captions.write_text(captions.read_text().replace("../controls/b.png", "../controls/none.png"))
    with pytest.raises(ValueError, match=r"conditioning_image.*controls named do not exist: .*none.png"):
        _data(images, captions_file=str(captions)).check_inputs()


def test_settings_that_cannot_pair_are_refused(tmp_path):
    images, controls = _pairs(tmp_path)
    with pytest.raises(ValueError, match="data.validation_images holds 1 control images: give as many"):
        _data(images, validation_images=[str(controls / "a.png")], sample_prompts=["x", "y"])
    with pytest.raises(ValueError, match="ControlNet training has no prior preservation"):
        _data(images, control_dir=str(controls), num_class_images=2, class_prompt="a star")
    with pytest.raises(ValueError, match="no ControlNet: set model.trainable='controlnet'"):
        _data(images, control_dir=str(controls)).check_inputs(tiny_module())
    with pytest.raises(ValueError, match="model.trainable='controlnet' needs control images"):
        _data(images).check_inputs(tiny_module(trainable="controlnet"))


def test_a_controlnet_fit_through_the_cli_exports_a_controlnet_pipeline_and_draws_control_columns(tmp_path):
    images, controls = _pairs(tmp_path, size=(32, 32))
    root = tmp_path / "run"
    main(["fit", "--config", str(REPO / "experiments/dreambooth.yaml"), "--config",
          str(REPO / "configs/model/tiny_t2i.yaml"), f"--data.instance_dir={images}", "--data.instance_prompt=a star",
          "--data.num_class_images=0", f"--data.control_dir={controls}", "--model.trainable=controlnet",
          f"--data.validation_images=[{controls / 'a.png'}, {controls / 'b.png'}]",
          "--data.sample_prompts=[a red star, a blue star]", "--trainer.max_steps=3", "--model.lr=1e-3",
          f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
          "--trainer.enable_progress_bar=false"])  # fmt: skip
    run = root / "lightning_logs" / "version_0"
    pipe = StableDiffusionControlNetPipeline.from_pretrained(run / "export")
    assert type(pipe.controlnet).__name__ == "ControlNetModel"
    grids = sorted((run / "samples").glob("step_*.png"))
    assert grids
    grid = np.asarray(Image.open(grids[-1]))
    rows = json.loads((run / "samples" / "rows.json").read_text())
    upscale = grid.shape[0] // (2 * 32)
    assert grid.shape[1] == (len(rows["seeds"]) + 1) * 32 * upscale  # the control image, then one column per seed
    control = np.asarray(Image.open(controls / "a.png"), dtype=np.float32)
    first = grid[: 32 * upscale : upscale, : 32 * upscale : upscale].astype(np.float32)
    assert np.abs(first - control).max() <= 1.0  # the first row starts with its control image
