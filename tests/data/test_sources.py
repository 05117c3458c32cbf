"""Source images for editing models (FLUX.1 Kontext, Qwen-Image-Edit): paired with the training images by name
(``data.source_dir``) or by the captions file's ``cond_image`` field, every mismatch named in one error, cropped and
flipped with their image, refused where they cannot mean anything, and a fit through the CLI that exports the editing
pipeline, draws source | samples grids and predicts from the validation sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_module, write_pairs
from diffusers import FluxKontextPipeline
from PIL import Image

from lightning_ft.data import LimitedDataModule
from lightning_ft.run import main


def _pairs(root, names=("a", "b", "c"), size=(40, 32)):
    return write_pairs(root, "sources", names, size)


def _data(images, **kwargs) -> LimitedDataModule:
    return LimitedDataModule(instance_dir=str(images), instance_prompt="a star", resolution=32, **kwargs)


def _kontext():
    return tiny_module(None, "tiny_flux_kontext", family="flux_kontext")


def test_sources_pair_by_name_and_follow_their_images_crop_and_flip(tmp_path):
    images, sources = _pairs(tmp_path)
    (sources / "c.jpg").unlink()
    Image.open(images / "c.png").save(sources / "c.png")  # lossless: the source equals its image
    data = _data(images, source_dir=str(sources), center_crop=False, random_flip=True, repeats=8)
    data.setup("fit")
    for index in range(len(data.dataset)):
        item = data.dataset[index]
        assert "control_values" not in item
        # Each source is its image: the same crop and flip give the same pixels, in [0, 1] instead of [-1, 1].
        torch.testing.assert_close(item["source_values"], (item["pixel_values"] + 1) / 2, rtol=0, atol=1e-6)
    batch = next(iter(data.train_dataloader()))
    assert batch["source_values"].shape == batch["pixel_values"].shape
    validation = next(iter(data.val_dataloader()))
    assert validation["source_values"].shape == validation["pixel_values"].shape


def test_every_mismatch_is_named_in_one_error(tmp_path):
    images, sources = _pairs(tmp_path)
    (sources / "b.png").unlink()
    Image.new("RGB", (40, 32)).save(sources / "stray.png")
    with pytest.raises(ValueError, match=r"data.source_dir: the source images do not pair .*1 images have no source "
                                         r"image: .*b.png.*1 sources have no image of the same name \(stem\): "
                                         r".*stray.png"):  # fmt: skip
        _data(images, source_dir=str(sources)).check_inputs()
    (sources / "stray.png").unlink()
    Image.new("RGB", (40, 32)).save(sources / "b.png")
    Image.new("RGB", (32, 32)).save(sources / "a.png")  # another aspect ratio than its 40x32 image
    with pytest.raises(ValueError, match=r"1 sources have another aspect ratio.*a.png' is 32x32 but its image .* is "
                                         r"40x32"):  # fmt: skip
        _data(images, source_dir=str(sources)).check_inputs()
    Image.new("RGB", (80, 64), (255, 0, 0)).save(sources / "a.png")  # same aspect, twice the size: resized
    data = _data(images, source_dir=str(sources))
    data.check_inputs()
    assert data.sources[0].size == (40, 32) and data.sources[0].getpixel((5, 5)) == (255, 0, 0)
    with pytest.raises(FileNotFoundError, match="data.source_dir: folder .*nowhere.* does not exist"):
        _data(images, source_dir=str(tmp_path / "nowhere")).check_inputs()


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_the_captions_files_cond_image_field_gives_the_sources(tmp_path, suffix):
    images, sources = _pairs(tmp_path)
    rows = [("a.png", "make it red", "../sources/a.png"), ("b.png", "make it blue", "../sources/b.png"),
            ("c.png", "make it green", "../sources/c.jpg")]  # fmt: skip
    captions = images / f"captions.{suffix}"
    if suffix == "jsonl":
        captions.write_text("".join(json.dumps({"file": f, "caption": c, "cond_image": g}) + "\n"
                                    for f, c, g in rows))  # fmt: skip
    else:
        captions.write_text("file,caption,cond_image\n" + "".join(f"{f},{c},{g}\n" for f, c, g in rows))
    data = _data(images, captions_file=str(captions))
    data.check_inputs()
    assert data._instances[1] == ["make it red", "make it blue", "make it green"]
    assert len(data.sources) == 3 and data.controls is None
    with pytest.raises(ValueError, match="data.source_dir=.* and the 'cond_image' field .* both give the source"):
        _data(images, captions_file=str(captions), source_dir=str(sources)).check_inputs()
    captions.write_text(captions.read_text().replace("../sources/b.png", "../sources/none.png"))
    with pytest.raises(ValueError, match=r"'cond_image' field.*sources named do not exist: .*none.png"):
        _data(images, captions_file=str(captions)).check_inputs()


def test_settings_that_cannot_pair_are_refused(tmp_path):
    images, sources = _pairs(tmp_path)
    with pytest.raises(ValueError, match="data.source_dir=.* and data.control_dir=.*give the one the model reads"):
        _data(images, source_dir=str(sources), control_dir=str(sources))
    with pytest.raises(ValueError, match="class images have no source images; editing models train without prior "
                                         "preservation, as diffusers' Kontext script"):  # fmt: skip
        _data(images, source_dir=str(sources), num_class_images=2, class_prompt="a star")
    with pytest.raises(ValueError, match="source images are given .* but the stable_diffusion family is not an "
                                         "editing model"):  # fmt: skip
        _data(images, source_dir=str(sources)).check_inputs(tiny_module())
    with pytest.raises(ValueError, match="the flux_kontext family is an editing model: give the source image of "
                                         "every training image"):  # fmt: skip
        _data(images).check_inputs(_kontext())


def test_an_editing_fit_through_the_cli_exports_kontext_draws_source_columns_and_predicts(tmp_path):
    images, sources = _pairs(tmp_path, size=(32, 32))
    root = tmp_path / "run"
    args = ["--config", str(REPO / "experiments/dreambooth_lora.yaml"), "--config",
            str(REPO / "configs/model/tiny_flux_kontext.yaml"), f"--data.instance_dir={images}",
            "--data.instance_prompt=make it a star", "--data.num_class_images=0", f"--data.source_dir={sources}",
            f"--data.validation_images=[{sources / 'a.png'}, {sources / 'b.png'}]",
            "--data.sample_prompts=[make it red, make it blue]", "--data.predict_seeds=[0]", "--model.lr=1e-3",
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            "--trainer.enable_progress_bar=false"]  # fmt: skip
    cli = main(["fit", *args, "--trainer.max_steps=2"])
    run = root / "lightning_logs" / "version_0"
    pipe = FluxKontextPipeline.from_pretrained(run / "export")
    assert type(pipe).__name__ == "FluxKontextPipeline"
    grids = sorted((run / "samples").glob("step_*.png"))
    assert grids
    grid = np.asarray(Image.open(grids[-1]))
    rows = json.loads((run / "samples" / "rows.json").read_text())
    upscale = grid.shape[0] // (2 * 32)
    assert grid.shape[1] == (len(rows["seeds"]) + 1) * 32 * upscale  # the source image, then one column per seed
    source = np.asarray(Image.open(sources / "a.png"), dtype=np.float32)
    first = grid[: 32 * upscale : upscale, : 32 * upscale : upscale].astype(np.float32)
    assert np.abs(first - source).max() <= 1.0  # the first row starts with its source image
    # predict samples the validation pairs (source, prompt), as generate does with them.
    module, data = cli.model, cli.datamodule
    batch = next(iter(data.predict_dataloader()))
    assert batch["sources"].shape == (2, 3, 32, 32) and list(batch["prompts"]) == ["make it red", "make it blue"]
    got = module.predict_step(batch, 0)
    expected = module.generate(prompts=["make it red", "make it blue"], seeds=[0, 0], sources=data.sample_controls())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_without_validation_images_the_grid_edits_the_first_training_sources(tmp_path):
    images, sources = _pairs(tmp_path, size=(32, 32))
    root = tmp_path / "run"
    main(["fit", "--config", str(REPO / "experiments/dreambooth_lora.yaml"), "--config",
          str(REPO / "configs/model/tiny_flux_kontext.yaml"), f"--data.instance_dir={images}",
          "--data.instance_prompt=make it a star", "--data.num_class_images=0", f"--data.source_dir={sources}",
          "--trainer.max_steps=1", f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
          "--trainer.enable_progress_bar=false"])  # fmt: skip
    run = root / "lightning_logs" / "version_0"
    grid = np.asarray(Image.open(sorted((run / "samples").glob("step_*.png"))[-1]))
    rows = json.loads((run / "samples" / "rows.json").read_text())
    assert rows["rows"] == ["make it a star"]
    upscale = grid.shape[0] // 32
    first = grid[: 32 * upscale : upscale, : 32 * upscale : upscale].astype(np.float32)
    assert np.abs(first - np.asarray(Image.open(sources / "a.png"), dtype=np.float32)).max() <= 1.0


def test_monitors_and_cards_that_ask_with_prompts_only_leave_an_editing_model_alone():
    from types import SimpleNamespace

    from lightning_ft.callbacks.periodic import PeriodicEvaluation
    from lightning_ft.report.model_card import widget_conditions

    module = _kontext()
    monitor = PeriodicEvaluation()
    with pytest.warns(UserWarning, match="flux_kontext family is an editing model, whose samples need source images"):
        assert monitor.off_for(module)
    assert not PeriodicEvaluation().off_for(tiny_module())
    # Without a grid (whose rows carry sources) a card has nothing to sample an edit from: no widget images.
    trainer = SimpleNamespace(callbacks=[], datamodule=SimpleNamespace(dataset=SimpleNamespace(prompts=["a star"])))
    assert widget_conditions(trainer, module) is None
    assert widget_conditions(trainer, tiny_module()).prompts == ("a star",)
