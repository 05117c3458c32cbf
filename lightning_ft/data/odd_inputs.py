"""Inputs that train, but probably not as meant: each check returns one line per finding, naming the file or key.

``LimitedDataModule.check_inputs`` warns with them (rank 0). None of them is an error: a tiny icon or a panorama may
be on purpose. The thresholds:

- ``MIN_SIDE_FRACTION``: an image whose shorter side is under a quarter of ``data.resolution`` is upscaled more
  than 4x. Past that each source pixel becomes a block of 4x4 or more of the training image (past 8x, more than one
  VAE latent cell): the model learns blur, or a flat colour from a 1x1 image. Up to 4x (a 128 px image at 512) is
  soft but still carries the subject.
- ``MIN_KEPT_FRACTION``: the square crop keeps (shorter side / longer side) of an image, the middle of it with
  ``data.center_crop``. Ordinary photos keep 56% (16:9) or 43% (21:9); under 25% (wider than 4:1) is a strip or a
  panorama of which most, and likely part of the subject, is never seen.
"""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

MIN_SIDE_FRACTION = 1 / 4
MIN_KEPT_FRACTION = 0.25
#: Per-file warnings of one kind shown, then one line for the rest: a folder of 300 phone photos is not 300 lines.
MAX_PER_KIND = 5


def _capped(messages: list[str], key: str, what: str) -> list[str]:
    if len(messages) <= MAX_PER_KIND:
        return messages
    return [*messages[:MAX_PER_KIND], f"{key}: and {len(messages) - MAX_PER_KIND} more {what}"]


def unsupported_warnings(skipped: Sequence[tuple[str, Path, str]]) -> list[str]:
    """The files ``skipped`` (key, path, why) because they are images Pillow cannot open (HEIC, SVG, JPEG XL...)."""
    by_key: dict[str, list[str]] = {}
    for key, path, why in skipped:
        if why.startswith("unsupported"):
            kind = mimetypes.guess_type(path.name)[0]
            by_key.setdefault(key, []).append(
                f"{key}: {str(path)!r} is an image in a format Pillow cannot open ({kind}): skipped; convert it to "
                "PNG or JPEG, or install a Pillow plugin for the format"
            )
    return [m for key, found in by_key.items() for m in _capped(found, key, "images Pillow cannot open, skipped")]


def image_warnings(files: Sequence[Path], images: Sequence[Image.Image], resolution: int, key: str) -> list[str]:
    """Images far below ``resolution``, and images of which the square crop keeps under ``MIN_KEPT_FRACTION``."""
    small, long = [], []
    for file, image in zip(files, images):
        w, h = image.size
        short, kept = min(w, h), min(w, h) / max(w, h)
        if short < resolution * MIN_SIDE_FRACTION:
            small.append(
                f"{key}: {str(file)!r} is {w}x{h} pixels, far below data.resolution={resolution} (its shorter side is "
                f"under a quarter of it): training upscales it {resolution / short:.0f}x, to blur or a flat colour; "
                "use a larger image, or a lower data.resolution"
            )
        if kept < MIN_KEPT_FRACTION:
            long.append(
                f"{key}: {str(file)!r} is {w}x{h} pixels: the square crop of training keeps {kept:.1%} of it (under "
                f"{MIN_KEPT_FRACTION:.0%}), so most of it is never seen; crop it around the subject"
            )
    return [*_capped(small, key, f"images far below data.resolution={resolution}"),
            *_capped(long, key, f"images of which the crop keeps under {MIN_KEPT_FRACTION:.0%}")]  # fmt: skip


def duplicate_warnings(folders: Sequence[tuple[str, Sequence[Path], Sequence[Image.Image]]]) -> list[str]:
    """Images with identical pixels after loading (a copy under another name or format, or the same photo in the
    instance and the class folder), one line per group; ``folders`` holds (key, files, images)."""
    groups: dict[str, list[tuple[str, Path]]] = {}
    for key, files, images in folders:
        for file, image in zip(files, images):
            digest = hashlib.sha256(repr(image.size).encode() + image.tobytes()).hexdigest()
            groups.setdefault(digest, []).append((key, file))
    messages = []
    for group in groups.values():
        if len(group) > 1:
            keys = " and ".join(dict.fromkeys(k for k, _ in group))
            names = ", ".join(repr(str(f)) for _, f in group)
            messages.append(
                f"{keys}: {len(group)} images are the same (identical pixels): {names}; each copy is one more "
                "training image of the same view: keep one"
            )
    return messages


def caption_warnings(
    instance_prompt: str | None,
    class_prompt: str | None,
    prior_preservation: bool,
    prompts: Sequence[str],
    sources: Sequence[str] | None,
    files: Sequence[Path],
    captions_file: str | None,
) -> list[str]:
    """An explicit ``data.instance_prompt`` that captions override, and a class prompt equal to an instance prompt.
    ``sources``: where each caption came from (``folder.caption_sources``; None: the prompt)."""
    messages = []
    if instance_prompt is not None and sources is not None:
        if captions_file:
            why = (f"data.captions_file={captions_file!r} gives each image its caption (first comes a captions file, "
                   "then .txt files beside the images, then data.instance_prompt)")  # fmt: skip
        else:
            first = Path(files[0]).with_suffix(".txt").name
            why = (f"the {len(files)} .txt caption files beside the images (e.g. {first!r}) win over it; remove or "
                   "rename them to train on the prompt")  # fmt: skip
        messages.append(f"data.instance_prompt={instance_prompt!r} is not used: {why}; or omit data.instance_prompt")
    if prior_preservation and class_prompt:
        same = [i for i, p in enumerate(prompts) if _words(p) == _words(class_prompt)]
        if same:
            where = "data.instance_prompt" if sources is None else sources[same[0]]
            more = f" (and {len(same) - 1} more captions)" if sources is not None and len(same) > 1 else ""
            words = class_prompt.split()
            example = " ".join([*words[:-1], "sks", words[-1]])
            messages.append(
                f"data.class_prompt={class_prompt!r} is the instance prompt of {where}{more}: prior preservation would "
                "then teach the subject as the class itself; give the instance prompt a rare identifier, e.g. "
                f"{example!r}"
            )
    return messages


def _words(prompt: str) -> list[str]:
    # Tokenizers lower-case and split on spaces, so "A dog " and "a dog" are one prompt to the model.
    return prompt.lower().split()


def token_warnings(module, prompts: dict[str, str]) -> list[str]:
    """Prompts the model reads only in part (the tokenizer cuts them at the length the pipeline keeps) or with
    words its tokenizer does not know (mapped to its unknown token). ``prompts``: text -> where it comes from.

    The model's family tokenizes, as in training (its template, its lengths); that it may have cut a prompt shows as
    an id tensor that appending text to the prompt does not change. How much was cut is counted with the plain
    tokenizer whose truncated ids are that tensor: its untruncated length less the tensor's (nothing, when the prompt
    exactly fills it). A family that wraps prompts in a template (no plain tokenizer makes its ids) cut the prompt
    when dropping its last word does not change the ids either, and is said to drop at least the prompt's excess
    over the window."""
    family, parts = getattr(module, "family", None), getattr(module, "parts", None)
    tokenizers = {k: t for k, t in (getattr(parts, "tokenizers", None) or {}).items() if t is not None}
    if not prompts or not tokenizers or not hasattr(family, "tokenize"):
        return []  # a class-conditional or unconditional model: no prompts to read
    texts = list(prompts)
    kept = family.tokenize(parts, texts)
    longer = family.tokenize(parts, [f"{t} {t}" for t in texts])
    # A tensor that differs from the first word's alone carries the text (unlike e.g. Sana's empty-prompt flag).
    first = family.tokenize(parts, [(t.split() or [t])[0] for t in texts])
    shorter = family.tokenize(parts, [t.rsplit(None, 1)[0] if len(t.split()) > 1 else t for t in texts])
    messages = []
    for i, text in enumerate(texts):
        rows = [ids[i] for ids in kept]
        cut = [j for j, row in enumerate(rows)
               if torch.equal(row, longer[j][i]) and not torch.equal(row, first[j][i])]  # fmt: skip
        how = _cut(tokenizers, text, rows, cut, [ids[i] for ids in shorter]) if cut else None
        if how:
            messages.append(f"{prompts[text]}: {text!r} is longer than the model reads: {how}")
        unknown: dict[tuple[str, ...], list[str]] = {}
        for key, tokenizer in tokenizers.items():
            unk = tokenizer.unk_token_id
            # Only when what the model is given holds the unknown token (not when it is in a part that is cut off).
            if unk is None or not any(unk in row.tolist() for row in rows):
                continue
            words = tuple(w for w in dict.fromkeys(text.split()) if unk in _ids(tokenizer, w, special=False))
            if words:
                unknown.setdefault(words, []).append(key)
        for words, keys in unknown.items():
            unk_token = tokenizers[keys[0]].unk_token
            messages.append(
                f"{prompts[text]}: {' and '.join(keys)} does not know {', '.join(map(repr, words))} in {text!r}: "
                f"{'it becomes' if len(words) == 1 else 'they become'} {unk_token!r}, as every unknown word does, so "
                "the model cannot tell them apart; use words of the model's vocabulary"
            )
    return messages


def _ids(tokenizer, text: str, special: bool = True, **kwargs) -> list[int]:
    # verbose=False: an untruncated prompt longer than the tokenizer's maximum is what is being measured, not a slip.
    return list(tokenizer(text, add_special_tokens=special, verbose=False, **kwargs).input_ids)


def _cut(tokenizers: dict, text: str, rows: list, cut: list[int], shorter: list) -> str | None:
    """How much of ``text`` the ``cut`` rows of the family's ids drop (None: nothing), by the plain tokenizers that
    made them; ``shorter``: the family's ids of ``text`` without its last word."""
    found, paired = {}, set()
    for key, tokenizer in tokenizers.items():
        full = len(_ids(tokenizer, text))
        for j in cut:
            width = rows[j].shape[-1]
            if _ids(tokenizer, text, padding="max_length", max_length=width, truncation=True) == rows[j].tolist():
                paired.add(j)
                if full > width:
                    found.setdefault(key, f"{key} keeps {width} of its {full} tokens ({full - width} dropped)")
    if found:
        return "; ".join(found.values()) + ": the end of the prompt is not trained on; shorten it"
    templated = [j for j in cut if j not in paired and torch.equal(rows[j], shorter[j])]
    if not templated:
        return None  # the prompt exactly fills what the model keeps
    key, tokenizer = next(iter(tokenizers.items()))
    full, width = len(_ids(tokenizer, text)), max(rows[j].shape[-1] for j in templated)
    return (f"it keeps {width} tokens with its prompt template, the prompt alone is {full} ({key}), so at least "
            f"{max(full - width, 1)} are dropped: the end of the prompt is not trained on; shorten it")  # fmt: skip
