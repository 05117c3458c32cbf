"""Reading loss masks (``lightning_ft.data.masks``): a mask folder matched by file stem, or the images' alpha
channels; every mismatch is one error naming the files and the config key; what trains but probably not as meant is
a warning naming the files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ft.data.masks import mask_tensor, mask_warnings, read_masks


def _image(path, size=(32, 24), mode="RGB", **save):
    color = {"RGB": (200, 40, 40), "RGBA": (200, 40, 40, 255), "L": 128, "LA": (128, 255)}[mode]
    Image.new(mode, size, color).save(path, **save)
    return path


def _mask_array(size=(32, 24), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- mask folder
def test_masks_are_matched_to_images_by_stem_in_any_format(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    files = [_image(images / "a.jpg"), _image(images / "b.png"), _image(images / "c.webp", lossless=True)]
    arrays = [_mask_array(seed=i) for i in range(3)]
    Image.fromarray(arrays[0]).save(masks / "a.png")  # a.jpg <-> a.png
    Image.fromarray(arrays[1]).save(masks / "b.bmp")
    Image.fromarray(np.stack([arrays[2]] * 3, -1)).save(masks / "c.tiff")  # an RGB mask: its luminance
    (masks / "notes.txt").write_text("not an image")  # ignored, as in an image folder
    read = read_masks(files, str(masks), alpha_mask=False)
    assert [m.mode for m in read] == ["L"] * 3
    for mask, array in zip(read, arrays):
        assert np.array_equal(np.asarray(mask), array)
    assert mask_warnings(files, read) == []


def test_one_error_lists_images_without_masks_and_masks_without_images(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    files = [_image(images / f"{name}.png") for name in ("a", "b", "c")]
    for name in ("a", "d", "e"):
        Image.fromarray(_mask_array()).save(masks / f"{name}.png")
    with pytest.raises(ValueError) as error:
        read_masks(files, str(masks), alpha_mask=False)
    message = str(error.value)
    assert message.startswith("data.mask_dir: ")
    assert "2 images have no mask" in message and "b.png" in message and "c.png" in message
    assert "2 masks have no image" in message and "d.png" in message and "e.png" in message
    assert "/a.png" not in message  # matched: neither the image nor its mask is named


def test_two_masks_of_one_name_are_refused_naming_both(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    files = [_image(images / "a.png")]
    Image.fromarray(_mask_array()).save(masks / "a.png")
    Image.fromarray(_mask_array()).save(masks / "a.bmp")
    with pytest.raises(ValueError, match=r"data\.mask_dir: several masks .* have the same name.*a\.bmp.*a\.png"):
        read_masks(files, str(masks), alpha_mask=False)


def test_a_missing_mask_folder_names_the_key(tmp_path):
    files = [_image(tmp_path / "a.png")]
    with pytest.raises(FileNotFoundError, match=r"data\.mask_dir: folder .*nowhere.* does not exist"):
        read_masks(files, str(tmp_path / "nowhere"), alpha_mask=False)


def test_masks_not_the_size_of_their_image_are_listed_in_one_error(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    files = [_image(images / f"{name}.png", size=(32, 24)) for name in ("a", "b", "c")]
    Image.fromarray(_mask_array((32, 24))).save(masks / "a.png")
    Image.fromarray(_mask_array((24, 32))).save(masks / "b.png")  # transposed
    Image.fromarray(_mask_array((64, 48))).save(masks / "c.png")  # twice the size
    with pytest.raises(ValueError) as error:
        read_masks(files, str(masks), alpha_mask=False)
    message = str(error.value)
    assert message.startswith("data.mask_dir: 2 masks are not the size of their image")
    assert f"'{masks / 'b.png'}' is 24x32 but its image '{images / 'b.png'}' is 32x24" in message
    assert f"'{masks / 'c.png'}' is 64x48 but its image '{images / 'c.png'}' is 32x24" in message
    assert "a.png" not in message


def test_the_image_size_is_the_upright_one(tmp_path):
    """A phone photo stored sideways with an EXIF rotation: its mask is drawn over the upright image."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 32x24, shown 24x32
    files = [_image(images / "photo.jpg", size=(32, 24), exif=exif)]
    Image.fromarray(_mask_array((24, 32))).save(masks / "photo.png")
    assert read_masks(files, str(masks), alpha_mask=False)[0].size == (24, 32)
    Image.fromarray(_mask_array((32, 24))).save(masks / "photo.png")
    with pytest.raises(ValueError, match="is 32x24 but its image .* is 24x32"):
        read_masks(files, str(masks), alpha_mask=False)


def test_sixteen_bit_masks_are_scaled_to_eight_bits(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    files = [_image(images / "a.png", size=(4, 2))]
    Image.fromarray(np.array([[0, 65535, 32896, 257], [0, 0, 0, 0]], dtype=np.uint16)).save(masks / "a.png")
    mask = read_masks(files, str(masks), alpha_mask=False)[0]
    assert mask.mode == "L" and np.asarray(mask)[0].tolist() == [0, 255, 128, 1]


def test_all_zero_masks_are_named_in_one_warning(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    files = [_image(images / f"{name}.png") for name in ("a", "b", "c")]
    Image.new("L", (32, 24), 0).save(masks / "a.png")
    Image.fromarray(_mask_array()).save(masks / "b.png")
    Image.new("L", (32, 24), 0).save(masks / "c.png")
    said = mask_warnings(files, read_masks(files, str(masks), alpha_mask=False))
    assert len(said) == 1
    assert said[0].startswith("data.mask_dir: 2 of 3 masks are zero everywhere: ")
    assert str(files[0]) in said[0] and str(files[2]) in said[0] and str(files[1]) not in said[0]


# ------------------------------------------------------------------------------------------------ alpha mask
def test_the_alpha_channel_is_the_mask(tmp_path):
    alpha = _mask_array()
    rgba = np.dstack([np.full((24, 32, 3), 90, np.uint8), alpha])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.dstack([alpha[:, ::-1], alpha]), "LA").save(tmp_path / "b.png")
    palette = Image.new("P", (32, 24), 0)
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.paste(1, (0, 0, 16, 24))
    palette.save(tmp_path / "c.png", transparency=0)  # colour 0 (the right half) is transparent
    files = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    masks = read_masks(files, None, alpha_mask=True)
    assert np.array_equal(np.asarray(masks[0]), alpha)
    assert np.array_equal(np.asarray(masks[1]), alpha)
    expected = np.zeros((24, 32), np.uint8)
    expected[:, :16] = 255
    assert np.array_equal(np.asarray(masks[2]), expected)
    assert mask_warnings(files, masks) == []


def test_images_without_alpha_get_a_full_mask_and_one_warning(tmp_path):
    files = [_image(tmp_path / "a.jpg"), _image(tmp_path / "b.png", mode="RGBA"), _image(tmp_path / "c.png")]
    masks = read_masks(files, None, alpha_mask=True)
    assert all(np.asarray(m).min() == 255 and m.size == (32, 24) for m in masks)
    said = mask_warnings(files, masks)
    assert len(said) == 1
    assert said[0].startswith("data.alpha_mask: 2 of 3 images have no alpha channel: ")
    assert str(files[0]) in said[0] and str(files[2]) in said[0] and str(files[1]) not in said[0]


def test_both_options_are_refused_naming_both_keys(tmp_path):
    files = [_image(tmp_path / "a.png")]
    with pytest.raises(ValueError, match=r"data\.mask_dir=.*data\.alpha_mask=true"):
        read_masks(files, str(tmp_path), alpha_mask=True)


def test_no_option_reads_no_masks(tmp_path):
    assert read_masks([_image(tmp_path / "a.png")], None, alpha_mask=False) is None
    assert mask_warnings([tmp_path / "a.png"], None) == []


def test_mask_tensor_is_float_in_zero_one():
    mask = Image.fromarray(np.array([[0, 255], [128, 64]], dtype=np.uint8))
    tensor = mask_tensor(mask)
    assert tensor.dtype == torch.float32 and tensor.shape == (1, 2, 2)
    assert tensor[0, 0].tolist() == [0.0, 1.0] and tensor[0, 1, 0] == pytest.approx(128 / 255)
