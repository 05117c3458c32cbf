"""Which files are images and how one is read: the one reader of training images, shared by the data module (what
is trained on) and the run report (what it shows as trained on), so the two cannot disagree.

An image is whatever Pillow can open, decided by Pillow itself (its registered readers, including any plugin
installed later, such as one for HEIC) and not by a fixed list of extensions: TIFF, AVIF, GIF and WebP are read
like PNG and JPEG; an animated or multi-page file gives its first frame.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Modes PIL converts to RGB without losing meaning; e.g. 32-bit integer or float images are rejected.
CONVERTIBLE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "RGBX")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")


def _needs_missing_handler(factory) -> bool:
    """A stub reader (HDF5, GRIB, BUFR; WMF off Windows): it names the format, but decoding needs a handler that an
    application registers, and none was."""
    return (
        isinstance(factory, type)
        and issubclass(factory, ImageFile.StubImageFile)
        and (getattr(factory, "_handler", None) is None)
    )


def readable_extensions() -> set[str]:
    """Lower-case suffixes (``.png``) of the formats this Pillow can decode: those it registered a reader for (not
    PDF, which it only writes), less the stubs. Asked each time: a plugin registered after import (pillow-heif,
    pillow-jxl) counts."""
    Image.init()
    formats = {fmt for fmt, (factory, _) in Image.OPEN.items() if not _needs_missing_handler(factory)}
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in formats}


def classify(path: Path, extensions: set[str] | None = None) -> str:
    """What ``path`` (a file) is to a folder of training images:

    - ``"image"``: Pillow decodes files with this extension (whether this one decodes is ``load_image``'s to say:
      a corrupt ``.png`` is an error, not something to skip), or it opens this file by its content (a JPEG
      saved without an extension, a ``.mpo`` from a 3D camera);
    - ``"hidden"``: a dot file, e.g. macOS's ``.DS_Store`` or the ``._photo.jpg`` resource forks a copy to a USB
      stick leaves beside each photo (not images, though named like them);
    - ``"unsupported"``: an image by its type (``image/heic``, ``image/svg+xml``, ...) that Pillow cannot open;
    - ``"other"``: anything else (notes, captions, videos).

    ``extensions``: ``readable_extensions()``, when the caller asks for many files."""
    if path.name.startswith("."):
        return "hidden"
    kind = mimetypes.guess_type(path.name)[0] or ""
    if kind.startswith(("video/", "audio/", "text/")):
        return "other"  # e.g. .mpg, whose header Pillow reads but whose frames it cannot decode
    if path.suffix.lower() in (readable_extensions() if extensions is None else extensions):
        return "image"
    if kind and not kind.startswith("image/"):
        return "other"  # a known non-image type (.json, .pdf, .zip): not opened
    try:
        with Image.open(path) as opened:
            if not _needs_missing_handler(type(opened)):
                return "image"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        pass
    return "unsupported" if kind else "other"


def image_files(folder: Path) -> list[Path]:
    """Sorted image files (see ``classify``) directly in ``folder``."""
    extensions = readable_extensions()
    return sorted(p for p in folder.iterdir() if p.is_file() and classify(p, extensions) == "image")


def load_image(file: Path) -> Image.Image:
    """Open and fully decode an image as RGB, turned upright as its EXIF orientation says (phone photos are stored
    sideways with a rotation tag); a truncated, unreadable or unconvertible file raises naming it."""
    try:
        with Image.open(file) as opened:
            opened.load()  # decodes everything now (the first frame), so a truncated file fails here, not mid-training
            image = ImageOps.exif_transpose(opened)
            if image.mode in SIXTEEN_BIT_MODES:
                # 16-bit grayscale (scientific or medical PNGs): scale to 8 bits instead of clipping at 255.
                array = np.asarray(image, dtype=np.float64)
                array = array / 257.0 if array.max() > 255 else array
                return Image.fromarray(array.clip(0, 255).round().astype(np.uint8), mode="L").convert("RGB")
            if image.mode not in CONVERTIBLE_MODES:
                raise ValueError(f"image {str(file)!r} has mode {image.mode!r}, which cannot be converted to RGB")
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                # Transparent pixels become white, as most viewers show them, instead of arbitrary colour.
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"image {str(file)!r} cannot be read ({type(error).__name__}: {error})") from None
