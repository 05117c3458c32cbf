"""Paired images: one image per training image, read and paired before anything runs. Two kinds (``PairedKind``):

- control images for ControlNet training (``CONTROLS``);
- source images for editing models (``SOURCES``: FLUX.1 Kontext, Qwen-Image-Edit), the image each training image is
  an edit of.

Two places each, as diffusers' scripts and datasets have them:

- a folder (``data.control_dir``, ``data.source_dir``) with one image per training image, of the same name (stem:
  ``a.jpg`` <-> ``a.png``);
- a field in each row of the captions file (``captions.jsonl``, or a ``.csv`` whose header is ``file,caption,<field>``):
  a path relative to the captions file's folder. Controls: ``conditioning_image`` (the default of the ControlNet
  scripts' ``--conditioning_image_column``); sources: ``cond_image`` (the Kontext script's ``--cond_image_column``,
  which has no default name; its batches call them ``cond_images``).

Every mismatch (an image without its pair, a pair without an image, a file that cannot be read, a pair whose aspect
ratio is not its image's) is listed in one error naming the files. A paired image of another size but the same aspect
ratio is resized to its image's size (bilinear), so both go through the same crop and flip
(``to_tensor_with_geometry``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from lightning_ft.images import image_files, load_image

#: The captions-file field of a row's control image (diffusers' ``--conditioning_image_column`` default name).
CONTROL_COLUMN = "conditioning_image"
#: The captions-file field of a row's source image (an editing model's; the Kontext script's ``--cond_image_column``).
SOURCE_COLUMN = "cond_image"


@dataclass(frozen=True)
class PairedKind:
    """One kind of paired image: its folder setting (under ``data.``), its captions-file field and its noun."""

    setting: str
    column: str
    noun: str


CONTROLS = PairedKind("control_dir", CONTROL_COLUMN, "control")
SOURCES = PairedKind("source_dir", SOURCE_COLUMN, "source")
#: Files named in a message before "and N more".
NAMED = 10


def _names(paths) -> str:
    shown = ", ".join(repr(str(p)) for p in list(paths)[:NAMED])
    return shown + (f" and {len(paths) - NAMED} more" if len(paths) > NAMED else "")


def control_column(captions_file: str | None, column: str = CONTROL_COLUMN) -> dict[str, str] | None:
    """Image file name -> its control's (``column``'s) path (as written) from the captions file's
    ``conditioning_image`` (``column``) field; None when the file has no such field."""
    if not captions_file:
        return None
    path = Path(captions_file)
    table: dict[str, str] = {}
    if path.suffix == ".jsonl":
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            if line.strip():
                row = json.loads(line)  # read_captions has checked every row
                if column in row:
                    table[Path(row["file"]).name] = str(row[column])
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
        header = [c.strip().lower() for c in rows[0]] if rows else []
        if column in header:
            file_at, control_at = header.index("file"), header.index(column)
            for row in rows[1:]:
                if any(field.strip() for field in row):
                    table[Path(row[file_at]).name] = row[control_at]
    return table or None


def read_controls(files: list[Path], images: list[Image.Image], control_dir: str | None,
                  captions_file: str | None, key: str = "data") -> list[Image.Image] | None:  # fmt: skip
    """One RGB control image per training image (``files``, already read as ``images``), at its image's size; None
    when the data has none. See the module docstring for the sources and the errors."""
    return read_paired(files, images, control_dir, captions_file, key, CONTROLS)


def read_sources(files: list[Path], images: list[Image.Image], source_dir: str | None,
                 captions_file: str | None, key: str = "data") -> list[Image.Image] | None:  # fmt: skip
    """One RGB source image per training image (an editing model's), at its image's size; None when the data has
    none. See the module docstring for the sources and the errors."""
    return read_paired(files, images, source_dir, captions_file, key, SOURCES)


def read_paired(files: list[Path], images: list[Image.Image], folder: str | None, captions_file: str | None,
                key: str, kind: PairedKind) -> list[Image.Image] | None:  # fmt: skip
    """One RGB image of ``kind`` per training image, from ``folder`` or the captions file's field; None when the data
    has none (module docstring)."""
    column = control_column(captions_file, kind.column)
    noun, setting = kind.noun, f"{key}.{kind.setting}"
    if folder and column:
        raise ValueError(f"{setting}={folder!r} and the {kind.column!r} field of {key}.captions_file="
                         f"{captions_file!r} both give the {noun} images: keep one")  # fmt: skip
    if folder:
        where = setting
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{where}: folder {str(root)!r} does not exist")
        by_stem: dict[str, list[Path]] = {}
        for pair in image_files(root):
            by_stem.setdefault(pair.stem, []).append(pair)
        stems = {f.stem for f in files}
        missing = [f for f in files if f.stem not in by_stem]
        orphans = sorted(paths[0] for stem, paths in by_stem.items() if stem not in stems)
        doubled = [paths for paths in by_stem.values() if len(paths) > 1]
        paths = {f: by_stem[f.stem][0] for f in files if f.stem in by_stem}
    elif column:
        where = f"{key}.captions_file ({kind.column!r} field)"
        root = Path(captions_file).parent
        missing = [f for f in files if f.name not in column]
        paths = {f: root / column[f.name] for f in files if f.name in column}
        orphans = [p for p in paths.values() if not p.is_file()]
        doubled = []
    else:
        return None
    problems = []
    if missing:
        problems.append(f"{len(missing)} images have no {noun} image: {_names(missing)}")
    if orphans:
        what = f"{noun}s have no image of the same name (stem)" if folder else f"{noun}s named do not exist"
        problems.append(f"{len(orphans)} {what}: {_names(orphans)}")
    if doubled:
        problems.append(f"several {noun}s share a name: {'; '.join(_names(d) for d in doubled[:NAMED])}")
    paired, unreadable, shapes = [], [], []
    if not problems:
        for file, image in zip(files, images):
            try:
                pair = load_image(paths[file])
            except ValueError as error:
                unreadable.append(str(error))
                continue
            if pair.size != image.size:
                (w, h), (cw, ch) = image.size, pair.size
                if abs(cw / ch - w / h) > 0.01 * (w / h):
                    shapes.append(f"{str(paths[file])!r} is {cw}x{ch} but its image {str(file)!r} is {w}x{h}")
                    continue
                pair = pair.resize(image.size, Image.BILINEAR)
            paired.append(pair)
    if unreadable:
        problems.append(f"{len(unreadable)} {noun}s cannot be read: " + "; ".join(unreadable[:NAMED]))
    if shapes:
        problems.append(f"{len(shapes)} {noun}s have another aspect ratio than their image: "
                        + "; ".join(shapes[:NAMED]))  # fmt: skip
    if problems:
        raise ValueError(f"{where}: the {noun} images do not pair with the training images one to one: "
                         + "; ".join(problems))  # fmt: skip
    return paired


def load_validation_controls(paths: list[str], resolution: int, key: str = "data.validation_images") -> torch.Tensor:
    """The control (or an editing model's source) images a grid or a monitor samples with
    (``data.validation_images``), resized (short side) and centre-cropped to ``resolution`` as diffusers' scripts
    prepare them: (N, 3, R, R) in [0, 1]."""
    from lightning_ft.data.folder import to_tensor_with_geometry

    missing = [p for p in paths if not Path(p).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"{key}: {len(missing)} images do not exist: {_names(missing)}")
    tensors = []
    for path in paths:
        pixels, _ = to_tensor_with_geometry(load_image(Path(path).expanduser()), resolution, True, False, None)
        tensors.append((pixels + 1) / 2)
    return torch.stack(tensors)
