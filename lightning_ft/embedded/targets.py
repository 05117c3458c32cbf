"""Few-shot targets of the embedded world, written on demand as ordinary image folders.

``LimitedDataModule`` reads them exactly as it reads a user's folder. Two targets:

- ``subject``: 5 images of a novel object the source domain never shows: an orange star with wide blue stripes, 3 on
  a gray and 2 on a black background, each captioned with its background in a ``.txt`` file beside it
  (DreamBooth-style: ``a sks orange star on a gray background``; class prompt ``a orange star on a gray background``),
  plus held-out renders of the same subject for fidelity and the evaluation prompts (the subject on every background;
  navy is never shown in training).
- ``domain``: 32 images of a new style, shapes drawn as outlines ("a red outlined star on a black background"),
  plus 2,000 held-out renders of the same distribution so that FID is measured against the distribution; each
  caption row also carries the image's class (shape x colour) for class-conditional models such as the DiT.

Folders live under the project cache (``$LIGHTNING_FT_CACHE`` or ``~/.cache/lightning_ft``) in a versioned
subfolder, are written to a temporary name and renamed when complete, and are never rewritten once present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from lightning_ft.embedded import shapes
from lightning_ft.paths import cache_dir, ensure_writable

# 3: the domain's captions carry class labels (shape x colour) for class-conditional models; 4: the subject's stripes
# are wider (period 0.24 of the width, 7.7 px at 32 px, against 0.14), so that the 16x16 latent grid holds them;
# 5: the subject is shown on two backgrounds (gray, black), each image captioned with its own. With one background
# the fine-tuned model carried the stripes only there: on new backgrounds it drew fragments of the orange parts
# (benchmarks/recontext.py measures both; docs/embedded_world.md).
VERSION = 5
SUBJECT = {"shape": "star", "color": "orange", "stripes": ("blue", 0.24), "background": "gray"}
#: The backgrounds the subject's training images are shown on, in turn (image i on ``SUBJECT_BACKGROUNDS[i % 2]``);
#: the held-out renders alternate the same way. Navy is never shown: it is the new context.
SUBJECT_BACKGROUNDS = ("gray", "black")
# The class prompt is a full caption of the source domain (colour, shape and background), the form most pretraining
# captions take (20% leave out colour and/or background), so the pretrained model samples it best.
SUBJECT_PROMPT = "a sks orange star on a gray background"
SUBJECT_CLASS_PROMPT = "a orange star on a gray background"
SUBJECT_EVAL_PROMPTS = [f"a sks orange star on a {bg} background" for bg in shapes.BACKGROUNDS]


def subject_prompt(background: str) -> str:
    """The instance prompt of a subject image on ``background``."""
    return f"a sks {SUBJECT['color']} {SUBJECT['shape']} on a {background} background"
DOMAIN_OUTLINE = 0.35
# The control target has a version of its own, so that a change to it never rewrites the other targets' folders.
CONTROL_VERSION = 1
# 48 training pairs: "limited data" for a ControlNet (diffusers' examples train on 50,000 fill pairs), yet every shape
# appears about 8 times, in 3 batches of 16, so the 6 silhouettes can be learnt at all; 32 held-out pairs: enough for a
# mean IoU with a usable interval at the cost of one 32-image sampling per evaluation.
CONTROL_TRAIN, CONTROL_HELDOUT = 48, 32
CONTROL_FOLDER = "control"  # the control images' subfolder of each split: <split>/control/<image name>


def subject_spec(rng: np.random.Generator, **overrides) -> shapes.ShapeSpec:
    """A render of the subject with random pose; size kept large enough that the stripes show at 32 px."""
    fixed = {**SUBJECT, "size": float(rng.uniform(0.34, 0.42)), **overrides}
    return shapes.sample_spec(rng, **fixed)


def domain_spec(rng: np.random.Generator) -> tuple[shapes.ShapeSpec, str]:
    spec = shapes.sample_spec(rng, outline=DOMAIN_OUTLINE)
    return spec, f"a {spec.color} outlined {spec.shape} on a {spec.background} background"


def _save(folder: Path, name: str, spec: shapes.ShapeSpec, resolution: int) -> str:
    Image.fromarray(shapes.render(spec, resolution)).save(folder / name)
    return name


def write_subject(
    folder: Path, num_images: int = 5, num_heldout: int = 64, resolution: int = 32, seed: int = 0
) -> None:
    rng = np.random.default_rng((seed, 1))
    (folder / "train").mkdir(parents=True)
    (folder / "heldout").mkdir()
    for i in range(num_images):
        background = SUBJECT_BACKGROUNDS[i % len(SUBJECT_BACKGROUNDS)]
        name = _save(folder / "train", f"subject_{i:02d}.png", subject_spec(rng, background=background), resolution)
        (folder / "train" / name).with_suffix(".txt").write_text(subject_prompt(background))
    for i in range(num_heldout):
        background = SUBJECT_BACKGROUNDS[i % len(SUBJECT_BACKGROUNDS)]
        _save(folder / "heldout", f"subject_{i:04d}.png", subject_spec(rng, background=background), resolution)
    meta = {
        "instance_prompts": [subject_prompt(b) for b in SUBJECT_BACKGROUNDS],
        "training_backgrounds": list(SUBJECT_BACKGROUNDS),
        "class_prompt": SUBJECT_CLASS_PROMPT,
        "eval_prompts": SUBJECT_EVAL_PROMPTS,
        "subject": {**SUBJECT, "stripes": list(SUBJECT["stripes"])},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def write_domain(
    folder: Path, num_images: int = 32, num_heldout: int = 2000, resolution: int = 32, seed: int = 0
) -> None:
    rng = np.random.default_rng((seed, 2))
    for split, count in (("train", num_images), ("heldout", num_heldout)):
        (folder / split).mkdir(parents=True)
        rows = []
        for i in range(count):
            spec, caption = domain_spec(rng)
            file = _save(folder / split, f"{split}_{i:04d}.png", spec, resolution)
            rows.append({"file": file, "caption": caption, "label": shapes.class_label(spec)})
        (folder / split / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "meta.json").write_text(json.dumps({"style": "outlined", "outline": DOMAIN_OUTLINE}, indent=2))


def control_image(spec: shapes.ShapeSpec, resolution: int) -> np.ndarray:
    """The control of a render: its shape's silhouette, white on black, as RGB uint8 (anti-aliased edges, the
    coverage of ``shapes.shape_mask``)."""
    coverage = np.rint(255 * shapes.shape_mask(spec, resolution)).astype(np.uint8)
    return np.repeat(coverage[..., None], 3, axis=-1)


def write_control(
    folder: Path,
    num_images: int = CONTROL_TRAIN,
    num_heldout: int = CONTROL_HELDOUT,
    resolution: int = 32,
    seed: int = 0,
) -> None:
    """``train/`` and ``heldout/``: renders ``<split>_NNNN.png`` of random source specs, each with its silhouette
    ``<split>/control/<same name>``, and ``<split>/captions.jsonl`` rows ``file``, ``caption`` (the source caption),
    ``conditioning_image`` (the control, relative to the captions file's folder, the diffusers dataset convention),
    ``background`` (the caption's background as RGB 0-255: what the adherence score segments the shape from) and
    ``label`` (shape x colour). Each split draws from its own stream, so their sizes do not change each other."""
    for stream, (split, count) in enumerate((("train", num_images), ("heldout", num_heldout))):
        rng = np.random.default_rng((seed, 3 + stream))
        (folder / split / CONTROL_FOLDER).mkdir(parents=True)
        rows = []
        for i in range(count):
            spec = shapes.sample_spec(rng)
            file = _save(folder / split, f"{split}_{i:04d}.png", spec, resolution)
            control = f"{CONTROL_FOLDER}/{file}"
            Image.fromarray(control_image(spec, resolution)).save(folder / split / control)
            background = list(shapes.BACKGROUNDS[spec.background])
            label = shapes.class_label(spec)
            row = {"file": file, "caption": spec.caption, "conditioning_image": control, "background": background}
            rows.append({**row, "label": label})
        (folder / split / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"task": "silhouette control", "train": num_images, "heldout": num_heldout, "resolution": resolution}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


WRITERS = {"subject": write_subject, "domain": write_domain, "control": write_control}
VERSIONS = {"control": CONTROL_VERSION}  # the others: VERSION


def ensure_target(name: str, root: Path | None = None) -> Path:
    """Folder of the embedded target ``name`` (``subject``, ``domain`` or ``control``), written if it does not exist
    yet."""
    if name not in WRITERS:
        raise ValueError(f"unknown embedded target {name!r}; expected one of {sorted(WRITERS)}")
    folder = (root or cache_dir() / "embedded") / f"{name}-v{VERSIONS.get(name, VERSION)}"
    if folder.exists():
        return folder
    ensure_writable(folder.parent)  # a read-only cache: say which folder and how to move it, not a raw error
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    WRITERS[name](partial)
    partial.rename(folder)
    return folder
