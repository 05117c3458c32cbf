"""Control images for ControlNet training: one per training image, read and paired before anything runs.

Two sources, as diffusers' ControlNet scripts and datasets have them:

- ``data.control_dir``: a folder with one control image per training image, of the same name (stem: ``a.jpg`` <->
  ``a.png``);
- a ``conditioning_image`` field in each row of the captions file (``captions.jsonl``, or a ``.csv`` whose header is
  ``file,caption,conditioning_image``): a path relative to the captions file's folder (the diffusers dataset
  convention of ``--conditioning_image_column``).

Every mismatch (an image without a control, a control without an image, a file that cannot be read, a control whose
aspect ratio is not its image's) is listed in one error naming the files. A control of another size but the same
aspect ratio is resized to its image's size (bilinear), so both go through the same crop and flip.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from PIL import Image

from lightning_ft.images import image_files, load_image

#: The captions-file field of a row's control image (diffusers' ``--conditioning_image_column`` default name).
CONTROL_COLUMN = "conditioning_image"
#: Files named in a message before "and N more".
NAMED = 10


def _names(paths) -> str:
    shown = ", ".join(repr(str(p)) for p in list(paths)[:NAMED])
    return shown + (f" and {len(paths) - NAMED} more" if len(paths) > NAMED else "")


def control_column(captions_file: str | None) -> dict[str, str] | None:
    """Image file name -> its control's path (as written) from the captions file's ``conditioning_image`` field;
    None when the file has no such field."""
    if not captions_file:
        return None
    path = Path(captions_file)
    table: dict[str, str] = {}
    if path.suffix == ".jsonl":
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            if line.strip():
                row = json.loads(line)  # read_captions has checked every row
                if CONTROL_COLUMN in row:
                    table[Path(row["file"]).name] = str(row[CONTROL_COLUMN])
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
        header = [c.strip().lower() for c in rows[0]] if rows else []
        if CONTROL_COLUMN in header:
            file_at, control_at = header.index("file"), header.index(CONTROL_COLUMN)
            for row in rows[1:]:
                if any(field.strip() for field in row):
                    table[Path(row[file_at]).name] = row[control_at]
    return table or None


def read_controls(files: list[Path], images: list[Image.Image], control_dir: str | None,
                  captions_file: str | None, key: str = "data") -> list[Image.Image] | None:  # fmt: skip
    """One RGB control image per training image (``files``, already read as ``images``), at its image's size; None
    when the data has none. See the module docstring for the sources and the errors."""
    column = control_column(captions_file)
    if control_dir and column:
        raise ValueError(f"{key}.control_dir={control_dir!r} and the {CONTROL_COLUMN!r} field of {key}.captions_file="
                         f"{captions_file!r} both give the control images: keep one")  # fmt: skip
    if control_dir:
        where = f"{key}.control_dir"
        folder = Path(control_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{where}: folder {str(folder)!r} does not exist")
        by_stem: dict[str, list[Path]] = {}
        for control in image_files(folder):
            by_stem.setdefault(control.stem, []).append(control)
        stems = {f.stem for f in files}
        missing = [f for f in files if f.stem not in by_stem]
        orphans = sorted(paths[0] for stem, paths in by_stem.items() if stem not in stems)
        doubled = [paths for paths in by_stem.values() if len(paths) > 1]
        paths = {f: by_stem[f.stem][0] for f in files if f.stem in by_stem}
    elif column:
        where = f"{key}.captions_file ({CONTROL_COLUMN!r} field)"
        root = Path(captions_file).parent
        missing = [f for f in files if f.name not in column]
        paths = {f: root / column[f.name] for f in files if f.name in column}
        orphans = [p for p in paths.values() if not p.is_file()]
        doubled = []
    else:
        return None
    problems = []
    if missing:
        problems.append(f"{len(missing)} images have no control image: {_names(missing)}")
    if orphans:
        what = "controls have no image of the same name (stem)" if control_dir else "controls named do not exist"
        problems.append(f"{len(orphans)} {what}: {_names(orphans)}")
    if doubled:
        problems.append(f"several controls share a name: {'; '.join(_names(d) for d in doubled[:NAMED])}")
    controls, unreadable, shapes = [], [], []
    if not problems:
        for file, image in zip(files, images):
            try:
                control = load_image(paths[file])
            except ValueError as error:
                unreadable.append(str(error))
                continue
            if control.size != image.size:
                (w, h), (cw, ch) = image.size, control.size
                if abs(cw / ch - w / h) > 0.01 * (w / h):
                    shapes.append(f"{str(paths[file])!r} is {cw}x{ch} but its image {str(file)!r} is {w}x{h}")
                    continue
                control = control.resize(image.size, Image.BILINEAR)
            controls.append(control)
    if unreadable:
        problems.append(f"{len(unreadable)} controls cannot be read: " + "; ".join(unreadable[:NAMED]))
    if shapes:
        problems.append(f"{len(shapes)} controls have another aspect ratio than their image: "
                        + "; ".join(shapes[:NAMED]))  # fmt: skip
    if problems:
        raise ValueError(f"{where}: the control images do not pair with the training images one to one: "
                         + "; ".join(problems))  # fmt: skip
    return controls


def load_validation_controls(paths: list[str], resolution: int, key: str = "data.validation_images") -> torch.Tensor:
    """The control images a grid or a monitor samples with (``data.validation_images``), resized (short side) and
    centre-cropped to ``resolution`` as diffusers' scripts prepare them: (N, 3, R, R) in [0, 1]."""
    from lightning_ft.data.folder import to_tensor_with_geometry

    missing = [p for p in paths if not Path(p).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"{key}: {len(missing)} control images do not exist: {_names(missing)}")
    tensors = []
    for path in paths:
        pixels, _ = to_tensor_with_geometry(load_image(Path(path).expanduser()), resolution, True, False, None)
        tensors.append((pixels + 1) / 2)
    return torch.stack(tensors)
