"""Read a small image folder and its captions, failing fast with errors that name the file at fault."""

from __future__ import annotations

import csv
import json
import mimetypes
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# The image reader lives below data and report (both read training images the same way); its names stay here too.
from lightning_ft.images import (  # noqa: F401 - re-exported
    CONVERTIBLE_MODES,
    SIXTEEN_BIT_MODES,
    classify,
    image_files,
    load_image,
    readable_extensions,
)

#: The header of a captions csv with a ControlNet's control image per row (diffusers' dataset column names).
THREE_COLUMNS = ["file", "caption", "conditioning_image"]
#: The header of a captions csv with an editing model's source image per row (the Kontext script's cond image).
SOURCE_COLUMNS = ["file", "caption", "cond_image"]

#: Why a file of an image folder is not used, by ``classify``'s kinds (and subfolders).
SKIP_REASONS = {
    "subfolder": "subfolders",
    "unsupported": "images in a format Pillow cannot open",
    "hidden": "hidden files",
    "other": "other files",
}


def list_images(folder: str | Path, key: str) -> list[Path]:
    """Sorted image files of ``folder`` (whatever Pillow opens: see ``lightning_ft.images.classify``); ``key`` (the
    config key) is named in the error if there are none."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key}: folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{key}: {str(path)!r} is not a folder")
    files = image_files(path)
    if not files:
        skipped = skipped_files(path, ())
        unsupported = [p.name for p, reason in skipped if reason.startswith("unsupported")]
        others = sorted(p.name for p, _ in skipped)[:5]
        hint = ""
        if unsupported:
            hint = (f"; {len(unsupported)} are images in a format Pillow cannot open ({', '.join(unsupported[:5])}): "
                    "convert them to PNG or JPEG, or install a Pillow plugin for the format")  # fmt: skip
        raise ValueError(f"{key}: folder {str(path)!r} holds no image Pillow can read; found {others or 'nothing'}"
                         + hint)  # fmt: skip
    return files


def skipped_files(folder: str | Path, used) -> list[tuple[Path, str]]:
    """Every entry of ``folder`` not in ``used`` (the images and caption files read), with why it is not used:
    ``"subfolder"``, ``"hidden"``, ``"unsupported (image/heic)"`` or ``"other"``; sorted by name."""
    used, extensions = set(used), readable_extensions()
    skipped = []
    for entry in sorted(Path(folder).expanduser().iterdir()):
        if entry in used:
            continue
        kind = "subfolder" if entry.is_dir() else classify(entry, extensions)
        if kind == "unsupported":
            kind = f"unsupported ({mimetypes.guess_type(entry.name)[0]})"
        # An image not in ``used`` (e.g. past data.num_class_images) is not skipped: it is simply not asked for.
        if kind != "image":
            skipped.append((entry, kind))
    return skipped


def describe_folder(folder: str | Path, files: list[Path], captions: list[Path] = (), key: str = "") -> str:
    """One line: how many images of ``folder`` are used, and what else it holds that is not (subfolders, hidden
    files, images Pillow cannot open and other files, besides the ``captions`` sidecars), so nothing is skipped
    without a word. The first five of each kind are named; ``skipped_files`` lists them all."""
    skipped = skipped_files(folder, [*files, *captions])
    line = f"{key}: using {len(files)} images" + (f" and {len(captions)} caption files" if captions else "")
    line += f" from {str(folder)!r}"
    parts = []
    for kind, what in SKIP_REASONS.items():
        group = [p.name + ("/" if p.is_dir() else "") for p, reason in skipped if reason.split(" ")[0] == kind]
        if group:
            parts.append(f"{len(group)} {what} ({', '.join(group[:5])}{', ...' if len(group) > 5 else ''})")
    return line + ("; skipped " + ", ".join(parts) if parts else "; skipped nothing")


def load_images(files: list[Path], key: str) -> list[Image.Image]:
    """``load_image`` of every file; when several cannot be used, one error lists them all (not one per run). The
    error names ``key``, the config key of the folder."""
    images, errors = [], []
    for file in files:
        try:
            images.append(load_image(file))
        except ValueError as error:
            errors.append(str(error))
    if len(errors) == 1:
        raise ValueError(f"{key}: {errors[0]}")
    if errors:
        raise ValueError(f"{key}: {len(errors)} of {len(files)} images cannot be used:\n  " + "\n  ".join(errors))
    return images


def read_captions(files: list[Path], captions_file: str | None, prompt: str | None, key: str) -> list[str]:
    """Captions for ``files``: from ``captions_file`` (jsonl with file/caption, or csv file,caption), else from
    per-image ``.txt`` files, else ``prompt``. Mismatches name the files at fault."""
    if captions_file:
        table = _read_caption_table(Path(captions_file), key)
        names = {f.name for f in files}
        unknown = sorted(set(table) - names)
        if unknown:
            raise ValueError(f"{key}: captions file {captions_file!r} names images not in the folder: {unknown[:5]}")
        uncaptioned = sorted(names - set(table))
        if uncaptioned:
            raise ValueError(f"{key}: captions file {captions_file!r} has no caption for {uncaptioned[:5]}")
        return [table[f.name] for f in files]
    sidecars = [f.with_suffix(".txt") for f in files]
    present = [s.exists() for s in sidecars]
    if any(present):
        if not all(present):
            missing = [f.name for f, p in zip(files, present) if not p]
            raise ValueError(f"{key}: some images have a .txt caption but these have none: {missing[:5]}")
        return [s.read_text(encoding="utf-8-sig").strip() for s in sidecars]
    if prompt is None:
        raise ValueError(f"{key}: no captions (no captions file, no .txt beside the images) and no prompt given")
    return [prompt] * len(files)


def caption_sources(files: list[Path], captions_file: str | None) -> list[str] | None:
    """Where ``read_captions`` took each file's caption from, to name it in a message (the same precedence): the
    captions file's row, the ``.txt`` beside the image, or None for all when the captions are the prompt."""
    if captions_file:
        return [f"data.captions_file={captions_file!r} (row of {f.name!r})" for f in files]
    sidecars = [f.with_suffix(".txt") for f in files]
    if any(s.exists() for s in sidecars):
        return [f"caption file {str(s)!r}" for s in sidecars]
    return None


def read_labels(files: list[Path], captions_file: str | None, key: str) -> list[int] | None:
    """Per-image class labels from a jsonl captions file whose rows carry an integer ``label`` (for
    class-conditional models); None when the file has no labels. Rows with and without one are an error."""
    if not captions_file or Path(captions_file).suffix != ".jsonl":
        return None
    labels: dict[str, int] = {}
    unlabelled = []
    for line in Path(captions_file).read_text(encoding="utf-8-sig").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)  # read_captions has already checked every row
        name = Path(row["file"]).name
        if "label" not in row:
            unlabelled.append(name)
            continue
        if isinstance(row["label"], bool) or not isinstance(row["label"], int) or row["label"] < 0:
            raise ValueError(
                f"{key}: {captions_file!r}: label of {name!r} must be an integer >= 0, got {row['label']!r}"
            )
        labels[name] = row["label"]
    if not labels:
        return None
    if unlabelled:
        raise ValueError(f"{key}: {captions_file!r} labels some images but not {sorted(unlabelled)[:5]}")
    return [labels[f.name] for f in files]


def _read_caption_table(path: Path, key: str) -> dict[str, str]:
    if not path.exists():
        raise FileNotFoundError(f"{key}: captions file {str(path)!r} does not exist")
    table: dict[str, str] = {}
    # utf-8-sig: files saved by Excel or Notepad start with a byte-order mark, which is not part of the first field.
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                table[Path(row["file"]).name] = str(row["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{key}: {str(path)!r} line {number} is not a JSON object with 'file' and 'caption' ({error})"
                ) from None
    elif path.suffix == ".csv":
        # file,caption; a header file,caption,conditioning_image (a ControlNet's data) or file,caption,cond_image (an
        # editing model's) makes it 3
        width, header = 2, THREE_COLUMNS
        with path.open(newline="", encoding="utf-8-sig") as handle:
            for number, row in enumerate(csv.reader(handle), 1):
                if not any(field.strip() for field in row):  # blank lines, e.g. a trailing one
                    continue
                names = [c.strip().lower() for c in row]
                if number == 1 and names in (["file", "caption"], THREE_COLUMNS, SOURCE_COLUMNS):
                    width, header = len(row), names
                    continue
                if len(row) != width:
                    fields = ",".join(header[:width])
                    raise ValueError(f"{key}: {str(path)!r} line {number} does not have {width} fields {fields}")
                table[Path(row[0]).name] = row[1]
    else:
        raise ValueError(f"{key}: captions file {str(path)!r} must be .jsonl or .csv")
    return table


def to_tensor(
    image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: np.random.Generator
) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square (centre or random), maybe flip; CHW in [-1, 1].
    ``to_tensor_with_geometry`` does the same and also returns where the crop came from (for SDXL)."""
    return to_tensor_with_geometry(image, resolution, center_crop, flip, rng)[0]


def resized_size(size: tuple[int, int], resolution: int | tuple[int, int]) -> tuple[int, int]:
    """(w, h) of an image of ``size`` (w, h) resized, keeping its aspect, to cover ``resolution``: a side (a square
    of it), or a bucket's (w, h). For a square this resizes the short side to ``resolution``."""
    tw, th = target_size(resolution)
    w, h = size
    scale = max(tw / w, th / h)
    return max(tw, round(w * scale)), max(th, round(h * scale))


def target_size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """(w, h) of a training view: ``resolution`` squared, or a bucket's (w, h) as given."""
    return (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))


def distinct_views(image: Image.Image, resolution: int | tuple[int, int], center_crop: bool, flip: bool) -> int:
    """How many different tensors ``to_tensor_with_geometry`` can make of ``image`` at ``resolution`` (a side, or a
    bucket's (w, h)): crop positions (one for a centre crop) times two with ``flip``. A cache keyed by content
    (``cache_latents``) holds at most this many entries."""
    tw, th = target_size(resolution)
    w, h = resized_size(image.size, (tw, th))
    positions = 1 if center_crop else (w - tw + 1) * (h - th + 1)
    return positions * (2 if flip else 1)


def to_tensor_with_geometry(
    image: Image.Image,
    resolution: int | tuple[int, int],
    center_crop: bool,
    flip: bool,
    rng: np.random.Generator,
    mask: Image.Image | None = None,
    control: Image.Image | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``to_tensor``'s pixels (the same ones, from the same draws of ``rng``) and SDXL's micro-conditioning geometry:
    ``original_size`` = ``[h, w]`` of ``image`` before any resize, and ``crop_top_left`` = ``[top, left]`` of the crop
    in the resized image, both long tensors of shape (2,).

    ``resolution`` is a side (a square view: the short side is resized to it) or an aspect bucket's ``(w, h)``: the
    image is resized with its aspect kept until it covers the bucket, then cropped to it, so it is never distorted.
    ``mask`` (an ``L`` image of the image's size, for the masked loss) goes through the same resize, crop and flip;
    it is returned as ``geometry["mask"]``, a float tensor (1, h, w) in [0, 1]. ``control`` (a ControlNet's control
    image, RGB, of the image's size) too, as ``geometry["control_values"]`` (3, h, w) in [0, 1] (not normalised,
    as diffusers' ControlNet scripts feed it).

    The convention is that of diffusers' ``train_text_to_image_sdxl.py`` and ``train_dreambooth_lora_sdxl.py``, which
    flip the resized image and then crop it, so the offset is in the flipped image's coordinates. Here the crop is
    drawn first and then flipped; a flipped crop at ``left`` is the crop of the flipped image at
    ``resized width - width - left``, which is what is reported. (The older ``x1 = image.width - x1`` after the
    crop, still in diffusers' LCM-distillation script, was removed from those two scripts as a bug in diffusers#6547.)
    The offsets are those of the pixels returned: the centre crop is at ``(size - resolution) // 2`` (its mirror
    image, rounded up, when flipped), which is diffusers' ``int(round((size - resolution) / 2.0))`` whenever
    ``size - resolution`` is even; the side that is resized to the target exactly has offset 0."""
    tw, th = target_size(resolution)
    w, h = image.size
    original_size = torch.tensor([h, w], dtype=torch.long)
    size = resized_size((w, h), (tw, th))
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR, reducing_gap=None)
        mask = mask.resize(size, Image.BILINEAR, reducing_gap=None) if mask is not None else None
        control = control.resize(size, Image.BILINEAR, reducing_gap=None) if control is not None else None
    w, h = image.size
    if center_crop:
        left, top = (w - tw) // 2, (h - th) // 2
    else:
        left, top = int(rng.integers(0, w - tw + 1)), int(rng.integers(0, h - th + 1))
    box = (left, top, left + tw, top + th)
    array = np.asarray(image.crop(box), dtype=np.float32)
    mask_array = np.asarray(mask.crop(box), dtype=np.float32) / 255.0 if mask is not None else None
    control_array = np.asarray(control.crop(box), dtype=np.float32) / 255.0 if control is not None else None
    if flip and rng.random() < 0.5:
        array = array[:, ::-1]
        mask_array = mask_array[:, ::-1] if mask_array is not None else None
        control_array = control_array[:, ::-1] if control_array is not None else None
        left = w - tw - left
    pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1) / 127.5 - 1.0
    geometry = {"original_size": original_size, "crop_top_left": torch.tensor([top, left], dtype=torch.long)}
    if mask_array is not None:
        geometry["mask"] = torch.from_numpy(np.ascontiguousarray(mask_array))[None]
    if control_array is not None:
        geometry["control_values"] = torch.from_numpy(np.ascontiguousarray(control_array)).permute(2, 0, 1)
    return pixels, geometry
