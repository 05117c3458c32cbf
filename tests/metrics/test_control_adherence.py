"""The control adherence score on renders of the embedded control target: a render scores ~1 with its own silhouette,
near chance with another pair's; and the target's layout (captions, controls, splits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ft.embedded import shapes
from lightning_ft.embedded.targets import CONTROL_HELDOUT, CONTROL_TRAIN, ensure_target
from lightning_ft.metrics.control_adherence import (
    bootstrap_interval,
    control_iou,
    mask_iou,
    shape_masks,
    silhouettes,
)


def _pixels(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def _split(name: str):
    folder = ensure_target("control") / name
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    images = torch.stack([_pixels(folder / r["file"]) for r in rows])
    controls = torch.stack([_pixels(folder / r["conditioning_image"]) for r in rows])
    return rows, images, controls, [r["background"] for r in rows]


@pytest.fixture(scope="module")
def heldout():
    return _split("heldout")


# ------------------------------------------------------------------------------------------------ the target
def test_control_target_layout():
    root = ensure_target("control")
    assert root.name == "control-v1"
    for split, count in (("train", CONTROL_TRAIN), ("heldout", CONTROL_HELDOUT)):
        rows, images, controls, _ = _split(split)
        assert len(rows) == count and images.shape == controls.shape == (count, 3, 32, 32)
        for row in rows:
            assert row["conditioning_image"] == f"control/{row['file']}"
            words = row["caption"].split()  # "a red star on a gray background": what, never where or how large
            assert words[0] == "a" and words[1] in shapes.COLORS and words[2] in shapes.SHAPES
            assert words[5] in shapes.BACKGROUNDS and row["background"] == list(shapes.BACKGROUNDS[words[5]])
        # controls are white-on-black silhouettes (grey only at anti-aliased edges), the same in every channel
        assert torch.equal(controls[:, 0], controls[:, 1]) and torch.equal(controls[:, 0], controls[:, 2])
        assert controls.amax() == 1 and controls.amin() == 0
        area = silhouettes(controls).flatten(1).float().mean(1)
        assert area.min() > 0.03 and area.max() < 0.6
    train, held = _split("train")[0], _split("heldout")[0]
    assert [r["caption"] for r in train[:8]] != [r["caption"] for r in held[:8]]  # the splits draw other specs
    assert ensure_target("control") == root  # written once, then reused


def test_control_target_is_deterministic(tmp_path):
    """Two roots hold the same bytes: the target is a function of its seed."""
    a, b = ensure_target("control", tmp_path / "a"), ensure_target("control", tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 * (CONTROL_TRAIN + CONTROL_HELDOUT) + 3
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


# -------------------------------------------------------------------------------------------------- the score
def test_renders_follow_their_own_controls(heldout):
    _, images, controls, backgrounds = heldout
    iou = control_iou(images, controls, backgrounds)
    assert iou.shape == (CONTROL_HELDOUT,)
    assert iou.mean() > 0.995 and iou.min() > 0.95  # measured 0.9995, min 0.983


def test_renders_with_another_pairs_control_score_low(heldout):
    _, images, controls, backgrounds = heldout
    for shift in (1, 5, 11):
        iou = control_iou(images, controls.roll(shift, 0), backgrounds)
        assert iou.mean() < 0.35  # measured 0.20 for shift 1: the chance overlap of two random shapes


def test_the_score_sees_position_and_shape(heldout):
    _, images, controls, backgrounds = heldout
    # the same shape moved by 4 pixels follows the control less; every pixel moved out of the image is lost
    moved = images.roll(4, dims=-1)
    moved[..., :4] = torch.tensor(backgrounds, dtype=torch.float32)[:, :, None, None] / 255
    assert control_iou(moved, controls, backgrounds).mean() < 0.75
    # nothing drawn (the background alone, with sampling noise): nothing follows the control
    generator = torch.Generator().manual_seed(0)
    blank = torch.tensor(backgrounds, dtype=torch.float32)[:, :, None, None].expand_as(images) / 255
    noisy = (blank + 0.03 * torch.randn(blank.shape, generator=generator)).clamp(0, 1)
    assert control_iou(noisy, controls, backgrounds).max() == 0
    # noise on a render does not move the score; neither does another colour of the shape
    noisy = (images + 0.03 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    assert control_iou(noisy, controls, backgrounds).mean() > 0.97
    mask = silhouettes(controls)[:, None]
    recoloured = torch.where(mask, torch.tensor([0.2, 0.9, 0.3])[:, None, None], images)
    assert control_iou(recoloured, controls, backgrounds).mean() > 0.97


def test_known_overlap_is_exact():
    # an 8x8 square drawn, a control of the same square moved 4 columns: 32 shared of 96 pixels
    image = torch.full((1, 3, 16, 16), 128 / 255)
    image[..., 4:12, 4:12] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    control = torch.zeros(1, 1, 16, 16)
    control[..., 4:12, 8:16] = 1
    assert control_iou(image, control, (128, 128, 128)).item() == pytest.approx(32 / 96)
    assert shape_masks(image, [(128, 128, 128)]).sum() == 64
    assert mask_iou(torch.zeros(2, 3, 3, dtype=torch.bool), torch.zeros(2, 3, 3, dtype=torch.bool)).tolist() == [1, 1]


def test_bad_inputs_are_named():
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="controls"):
        control_iou(images, torch.rand(2, 3, 16, 16), (0, 0, 0))
    with pytest.raises(ValueError, match="backgrounds"):
        control_iou(images, torch.rand(2, 3, 8, 8), [(0, 0, 0)] * 3)
    with pytest.raises(ValueError, match="0-255"):
        shape_masks(images, (0, 0, 300))
    with pytest.raises(ValueError, match="images"):
        shape_masks(torch.rand(3, 8, 8), (0, 0, 0))


def test_bootstrap_interval():
    values = torch.tensor([0.0] * 8 + [1.0] * 24)
    mean, low, high = bootstrap_interval(values)
    assert mean == 0.75 and low < mean < high
    half = 1.96 * (0.75 * 0.25 / 32) ** 0.5  # the normal approximation's half-width, 0.15
    assert high - low == pytest.approx(2 * half, rel=0.2)
    assert bootstrap_interval(values) == (mean, low, high)  # seeded
    assert bootstrap_interval([0.4] * 5) == pytest.approx((0.4, 0.4, 0.4))
    assert all(v != v for v in bootstrap_interval([]))
