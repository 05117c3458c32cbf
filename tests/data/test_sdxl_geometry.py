"""SDXL micro-conditioning: every item records the original size and the crop offset of its pixels, in the convention
of diffusers' SDXL training scripts, and the pixels themselves are exactly those of before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ft.data import LimitedDataModule
from lightning_ft.data.datamodule import LimitedDataset
from lightning_ft.data.folder import to_tensor, to_tensor_with_geometry

RES = 32


def _old_to_tensor(image, resolution, center_crop, flip, rng):
    """``to_tensor`` as it was before it reported geometry (commit cd0203b), verbatim."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR, reducing_gap=None)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    if flip and rng.random() < 0.5:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1) / 127.5 - 1.0


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _resized(image: Image.Image, resolution: int = RES) -> Image.Image:
    """The image with its short side resized to ``resolution``, as the reader resizes it."""
    w, h = image.size
    scale = resolution / min(w, h)
    return image.resize((round(w * scale), round(h * scale)), Image.BILINEAR, reducing_gap=None)


def _crop(image: Image.Image, top: int, left: int, resolution: int = RES) -> torch.Tensor:
    array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1) / 127.5 - 1.0


def _diffusers_centre(size: int, resolution: int = RES) -> int:
    # diffusers examples/text_to_image/train_text_to_image_sdxl.py:
    #     y1 = max(0, int(round((image.height - args.resolution) / 2.0)))
    return max(0, int(round((size - resolution) / 2.0)))


@pytest.mark.parametrize("width,height", [(48, 40), (40, 48)])
def test_centre_crop_records_original_size_and_diffusers_offset(width, height):
    image = _image(width, height)
    pixels, geometry = to_tensor_with_geometry(image, RES, True, False, None)
    assert geometry["original_size"].dtype == torch.long and geometry["crop_top_left"].dtype == torch.long
    assert geometry["original_size"].tolist() == [height, width]  # (h, w), as read, before the resize
    resized = _resized(image)
    assert resized.size == ((38, 32) if width > height else (32, 38))
    top, left = geometry["crop_top_left"].tolist()
    assert [top, left] == [_diffusers_centre(resized.height), _diffusers_centre(resized.width)]
    assert [top, left] == ([0, 3] if width > height else [3, 0])
    assert torch.equal(pixels, _crop(resized, top, left))


def test_random_crop_offset_is_where_the_pixels_come_from():
    image = _image(48, 40)
    resized = _resized(image)
    offsets = set()
    for seed in range(20):
        pixels, geometry = to_tensor_with_geometry(image, RES, False, False, np.random.default_rng(seed))
        assert geometry["original_size"].tolist() == [40, 48]
        top, left = geometry["crop_top_left"].tolist()
        assert top == 0 and 0 <= left <= resized.width - RES
        assert torch.equal(pixels, _crop(resized, top, left))
        offsets.add(left)
    assert len(offsets) > 3  # the crop does move


@pytest.mark.parametrize("center_crop", [False, True])
def test_flip_offset_is_in_the_flipped_image_as_diffusers_reports_it(center_crop):
    """diffusers' SDXL scripts flip the resized image, then crop it, and report the crop in the flipped image
    (the older ``x1 = image.width - x1`` after the crop was removed as a bug in diffusers#6547)."""
    for width, height in [(48, 40), (39, 32), (41, 32)]:  # margins 6, 7 (3 mod 4) and 9 (1 mod 4)
        image = _image(width, height, seed=width)
        resized = _resized(image)
        flipped_resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
        flips = []
        for seed in range(16):
            pixels, geometry = to_tensor_with_geometry(image, RES, center_crop, True, np.random.default_rng(seed))
            top, left = geometry["crop_top_left"].tolist()
            assert 0 <= left <= resized.width - RES and top == 0
            flipped = not torch.equal(pixels, _crop(resized, top, left))
            if flipped:
                assert torch.equal(pixels, _crop(flipped_resized, top, left))
                # the same pixels, as the mirror image of an unflipped crop at width - resolution - left
                assert torch.equal(pixels, _crop(resized, top, resized.width - RES - left).flip(-1))
            flips.append(flipped)
        assert any(flips) and not all(flips)


def test_centre_offset_follows_the_pixels_where_it_departs_from_the_diffusers_formula():
    # Margin 7: the reader's centre crop is at 7 // 2 = 3, diffusers' round(3.5) = 4; the recorded offset is the
    # crop actually taken, so that it always describes the pixels.
    image = _image(39, 32)
    pixels, geometry = to_tensor_with_geometry(image, RES, True, False, None)
    assert geometry["crop_top_left"].tolist() == [0, 3] and _diffusers_centre(39) == 4
    assert torch.equal(pixels, _crop(image, 0, 3))


@pytest.mark.parametrize("center_crop,flip", [(True, False), (True, True), (False, False), (False, True)])
def test_pixels_and_random_draws_are_unchanged(center_crop, flip):
    for width, height in [(48, 40), (40, 48), (32, 32), (39, 32), (100, 33), (20, 24)]:
        image = _image(width, height, seed=width * height)
        for seed in range(6):
            old_rng, new_rng, plain_rng = (np.random.default_rng((seed, 7)) for _ in range(3))
            old = _old_to_tensor(image, RES, center_crop, flip, old_rng)
            new, _ = to_tensor_with_geometry(image, RES, center_crop, flip, new_rng)
            assert torch.equal(old, new)
            assert torch.equal(old, to_tensor(image, RES, center_crop, flip, plain_rng))  # existing callers
            assert old_rng.random() == new_rng.random() == plain_rng.random()  # same number of draws


def test_dataset_items_unchanged_and_class_images_get_their_fields():
    instances = [_image(48, 40, 1), _image(40, 56, 2)]
    classes = [_image(64, 32, 3), _image(32, 32, 4), _image(35, 45, 5)]
    dataset = LimitedDataset(
        instances, ["a", "b"], classes, ["c"] * 3, resolution=RES, center_crop=False, random_flip=True, seed=3
    )
    for index in range(len(dataset)):
        item = dataset[index]
        rng = np.random.default_rng((3, index))
        instance, klass = instances[index % 2], classes[index % 3]
        assert torch.equal(item["pixel_values"], _old_to_tensor(instance, RES, False, True, rng))
        assert torch.equal(item["class_pixel_values"], _old_to_tensor(klass, RES, False, True, rng))
        assert item["original_size"].tolist() == [instance.height, instance.width]
        assert item["class_original_size"].tolist() == [klass.height, klass.width]
        for pixels, crop, image in (
            (item["pixel_values"], item["crop_top_left"], instance),
            (item["class_pixel_values"], item["class_crop_top_left"], klass),
        ):
            assert crop.dtype == torch.long and crop.shape == (2,)
            top, left = crop.tolist()
            resized = _resized(image)
            assert torch.equal(pixels, _crop(resized, top, left)) or torch.equal(
                pixels, _crop(resized.transpose(Image.FLIP_LEFT_RIGHT), top, left)
            )


def test_train_batches_stack_the_geometry(tmp_path):
    instance_dir, class_dir = tmp_path / "instance", tmp_path / "class"
    instance_dir.mkdir()
    class_dir.mkdir()
    for i, (w, h) in enumerate([(48, 40), (40, 48), (32, 32)]):
        _image(w, h, i).save(instance_dir / f"img_{i}.png")
    for i, (w, h) in enumerate([(64, 40), (36, 36)]):
        _image(w, h, 10 + i).save(class_dir / f"cls_{i}.png")
    data = LimitedDataModule(
        instance_dir=str(instance_dir), instance_prompt="x", class_dir=str(class_dir), class_prompt="y",
        num_class_images=2, resolution=RES, center_crop=False, random_flip=True, repeats=2, batch_size=4,
    )  # fmt: skip
    data.setup("fit")
    sizes = {(40, 48), (48, 40), (32, 32)}
    batches = list(data.train_dataloader())
    assert [len(b["pixel_values"]) for b in batches] == [4, 2]
    for batch in batches:
        n = len(batch["pixel_values"])
        for key in ("original_size", "crop_top_left", "class_original_size", "class_crop_top_left"):
            assert batch[key].dtype == torch.long and batch[key].shape == (n, 2), key
        assert {tuple(s) for s in batch["original_size"].tolist()} <= sizes
        assert {tuple(s) for s in batch["class_original_size"].tolist()} <= {(40, 64), (36, 36)}
        assert (batch["crop_top_left"] >= 0).all() and (batch["crop_top_left"][:, 0] <= 38 - RES).all()
    # Validation items (centre crop, no flip) carry the fields too.
    val = next(iter(data.val_dataloader()))
    assert val["original_size"].tolist() == [[40, 48], [48, 40], [32, 32]]
    assert val["crop_top_left"].tolist() == [[0, 3], [3, 0], [0, 0]]
