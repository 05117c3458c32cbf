"""Loss masks of training images (masked training, as kohya's sd-scripts and OneTrainer call it): one "L" image per
training image, 255 = train on this pixel, 0 = ignore it; the model weights its denoising loss with the mask at
latent resolution (``ObjectiveMixin.diffusion_loss``).

Two sources, one of them at a time:

- ``data.mask_dir``: a folder of masks matched to the images by file stem (``a.jpg`` <-> ``a.png``; any format
  Pillow opens), each the size of its image once both are turned upright by their EXIF orientation;
- ``data.alpha_mask``: the alpha channel of each image file (RGBA, LA, PA, or a palette / grey / RGB image with a
  transparent colour); an image without one is trained on everywhere (a full mask), with a warning naming it.

Every mismatch is one error listing the files at fault; nothing is silently skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lightning_ft.images import CONVERTIBLE_MODES, SIXTEEN_BIT_MODES, image_files

#: Files named in one error or warning; the rest are counted.
MAX_NAMED = 10
#: ``Image.info`` entries ``read_masks`` puts on each mask, for ``mask_warnings``: the config key it came from, and
#: True on the full masks given to images that have no alpha channel.
SOURCE_INFO = "lightning_ft.mask_source"
NO_ALPHA_INFO = "lightning_ft.no_alpha"
#: EXIF orientations that turn an image by 90 or 270 degrees (its width and height swap once upright).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def _names(paths: Sequence[Path | str]) -> str:
    shown = ", ".join(repr(str(p)) for p in paths[:MAX_NAMED])
    return shown + (f" and {len(paths) - MAX_NAMED} more" if len(paths) > MAX_NAMED else "")


def read_masks(
    files: list[Path], mask_dir: str | None, alpha_mask: bool, key: str = "data"
) -> list[Image.Image] | None:
    """One "L" mask per file of ``files`` (the training images), from ``mask_dir`` or the images' alpha channels;
    None when neither is set. ``key`` is the config section the settings are read from (``data``: errors name
    ``data.mask_dir`` / ``data.alpha_mask``). Use ``mask_warnings`` on the result for what trains but probably not
    as meant (all-zero masks, images without alpha)."""
    if mask_dir and alpha_mask:
        raise ValueError(
            f"{key}.mask_dir={mask_dir!r} and {key}.alpha_mask=true both give the loss masks: set one of them (a mask "
            "folder, or the images' own alpha channels)"
        )
    if mask_dir:
        return _folder_masks([Path(f) for f in files], mask_dir, f"{key}.mask_dir")
    if alpha_mask:
        return _alpha_masks([Path(f) for f in files], f"{key}.alpha_mask")
    return None


def _open_upright(file: Path) -> Image.Image:
    """The first frame of ``file``, fully decoded and turned upright by its EXIF orientation (as ``load_image``)."""
    try:
        with Image.open(file) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{str(file)!r} cannot be read ({type(error).__name__}: {error})") from None


def _upright_size(file: Path) -> tuple[int, int]:
    """(width, height) of an image once turned upright, from its header (no decoding)."""
    try:
        with Image.open(file) as opened:
            width, height = opened.size
            orientation = opened.getexif().get(0x0112)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"image {str(file)!r} cannot be read ({type(error).__name__}: {error})") from None
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def load_mask(file: Path) -> Image.Image:
    """A mask file as an "L" image, upright: any mode Pillow converts (an RGB mask gives its luminance, an alpha
    channel of the mask file is not read), 16-bit masks scaled to 8 bits as ``load_image`` scales 16-bit images."""
    image = _open_upright(file)
    if image.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64)
        array = array / 257.0 if array.max() > 255 else array
        return Image.fromarray(array.clip(0, 255).round().astype(np.uint8), mode="L")
    if image.mode not in CONVERTIBLE_MODES:
        raise ValueError(f"{str(file)!r} has mode {image.mode!r}, which cannot be converted to a grey mask")
    return image.convert("L")


def _folder_masks(files: list[Path], mask_dir: str, key: str) -> list[Image.Image]:
    folder = Path(mask_dir).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{key}: folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{key}: {str(folder)!r} is not a folder")
    by_stem: dict[str, list[Path]] = {}
    for mask in image_files(folder):
        by_stem.setdefault(mask.stem, []).append(mask)
    ambiguous = [paths for paths in by_stem.values() if len(paths) > 1]
    if ambiguous:
        listed = "; ".join(_names(paths) for paths in ambiguous[:MAX_NAMED])
        raise ValueError(f"{key}: several masks in {str(folder)!r} have the same name, so which one is meant for its "
                         f"image is unclear: {listed}; keep one of each")  # fmt: skip
    stems = {f.stem for f in files}
    unmasked = [f for f in files if f.stem not in by_stem]
    orphans = sorted(paths[0] for stem, paths in by_stem.items() if stem not in stems)
    if unmasked or orphans:
        parts = []
        if unmasked:
            parts.append(f"{len(unmasked)} images have no mask of the same name (stem) in it: {_names(unmasked)}")
        if orphans:
            parts.append(f"{len(orphans)} masks have no image of the same name (stem): {_names(orphans)}")
        raise ValueError(f"{key}: the masks of {str(folder)!r} do not match the training images one to one: "
                         + "; ".join(parts) + ". Each image needs one mask with its name (any image format, "
                         "e.g. photo.jpg <-> photo.png)")  # fmt: skip
    masks, errors, mismatched = [], [], []
    for file in files:
        mask_file = by_stem[file.stem][0]
        try:
            mask = load_mask(mask_file)
            size = _upright_size(file)
        except ValueError as error:
            errors.append(str(error))
            continue
        if mask.size != size:
            mismatched.append(f"{str(mask_file)!r} is {mask.size[0]}x{mask.size[1]} but its image {str(file)!r} is "
                              f"{size[0]}x{size[1]}")  # fmt: skip
        mask.info[SOURCE_INFO] = key
        masks.append(mask)
    if errors:
        raise ValueError(f"{key}: {len(errors)} masks cannot be used:\n  " + "\n  ".join(errors))
    if mismatched:
        shown = mismatched[:MAX_NAMED] + ([f"and {len(mismatched) - MAX_NAMED} more"] if len(mismatched) > MAX_NAMED
                                          else [])  # fmt: skip
        raise ValueError(f"{key}: {len(mismatched)} masks are not the size of their image (upright, as its EXIF "
                         "orientation turns it), so they cannot be laid over it:\n  " + "\n  ".join(shown))  # fmt: skip
    return masks


def has_alpha(image: Image.Image) -> bool:
    """Whether an (opened) image carries transparency: an alpha channel, or a transparent colour (``tRNS``)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )


def _alpha_masks(files: list[Path], key: str) -> list[Image.Image]:
    masks, errors = [], []
    for file in files:
        try:
            image = _open_upright(file)
        except ValueError as error:
            errors.append(f"image {error}")
            continue
        if has_alpha(image):
            mask = (image if image.mode in ("RGBA", "LA", "PA") else image.convert("RGBA")).getchannel("A")
        else:
            mask = Image.new("L", image.size, 255)
            mask.info[NO_ALPHA_INFO] = True
        mask.info[SOURCE_INFO] = key
        masks.append(mask)
    if errors:
        raise ValueError(f"{key}: {len(errors)} images cannot be read for their alpha channel:\n  "
                         + "\n  ".join(errors))  # fmt: skip
    return masks


def mask_warnings(files: Sequence[Path], masks: Sequence[Image.Image] | None) -> list[str]:
    """What ``read_masks``' masks train that is probably not meant, one line per kind naming the key and the files:
    masks that are zero everywhere (their images add no loss, unless ``model.unmasked_weight`` > 0), and images
    that ``data.alpha_mask`` found no alpha channel in (trained on everywhere)."""
    if not masks:
        return []
    key = masks[0].info.get(SOURCE_INFO, "data.mask_dir")
    empty = [f for f, m in zip(files, masks) if m.getextrema() == (0, 0)]
    opaque = [f for f, m in zip(files, masks) if m.info.get(NO_ALPHA_INFO)]
    messages = []
    if empty:
        messages.append(
            f"{key}: {len(empty)} of {len(masks)} masks are zero everywhere: {_names(empty)}; their images add "
            "nothing to the loss (unless model.unmasked_weight > 0): paint what is to be learned white, or remove "
            "these images"
        )
    if opaque:
        messages.append(
            f"{key}: {len(opaque)} of {len(masks)} images have no alpha channel: {_names(opaque)}; they are trained "
            "on everywhere (a full mask): save them as PNG or WebP with transparency where they are not to be learned"
        )
    return messages


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """A mask image (already cropped and flipped like its training image) as a float32 (1, H, W) tensor in [0, 1]:
    255 is exactly 1 and 0 exactly 0."""
    array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())[None]
