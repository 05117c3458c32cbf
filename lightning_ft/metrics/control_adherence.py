"""How closely a sample follows its control image: the IoU of the drawn shape with the control's silhouette.

The score is made for images of one shape on a flat background whose colour the prompt names ("a red star on a gray
background"), with a silhouette (white shape on black) as the control, the embedded world's control task
(``lightning_ft.embedded.targets``, ``control``). It is inferred, not taken from the papers: ControlNet's and
Diff-Tuning's "sudden convergence" is judged by eye on the samples; here a number stands in for the eye.

- ``shape_masks``: the pixels of a sample whose colour is more than half-way from the prompt's background colour to
  the drawn colour (Euclidean RGB distance; the drawn colour's distance is the image's 99th percentile of distances,
  robust to a few stray pixels, every shape of the world covering more than 6% of the image), and at least
  ``threshold`` from the background, so an image with nothing drawn gives an empty mask. Whatever was drawn counts,
  whatever its colour: the score measures where the shape is, not whether its colour is right. On a render this is
  the pixels at least half covered by the shape, the silhouette's own rule.
- ``control_iou``: per image, |mask & silhouette| / |mask | silhouette|, the silhouette being the control thresholded
  at 0.5 (the rendered silhouettes are anti-aliased coverage, so 0.5 is half-covered).

Colours are given as RGB in 0-255, the convention of the embedded world's palette and of its captions files'
``background`` column; the framework does not know colour names (it never imports the embedded world).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: The least Euclidean RGB distance (images in [0, 1]) from the background at which a pixel can count as drawn: half
#: the distance of the closest colour/background pair of the embedded world (purple on gray, 0.40), so that faint
#: noise on an empty background is not a shape.
DISTANCE_THRESHOLD = 0.2
#: A pixel counts as drawn above this fraction of the drawn colour's distance from the background: half-way, less a
#: margin for 8-bit rounding. Renders are anti-aliased in steps of 1/16 coverage, so 0.47 keeps exactly the pixels at
#: least half covered (at 0.5 the half-covered ones fall either side by rounding: IoU 0.974 instead of 0.9995 on the
#: control target's held-out renders).
RELATIVE_THRESHOLD = 0.47
#: The quantile of an image's distances taken as its drawn colour's distance (robust to a few stray pixels).
DRAWN_QUANTILE = 0.99
#: A control pixel is part of the silhouette above this value.
SILHOUETTE_THRESHOLD = 0.5


def background_colors(backgrounds, count: int) -> torch.Tensor:
    """``backgrounds`` as a float tensor (count, 3) in [0, 1]: one RGB colour in 0-255 for all images, or one per
    image (a sequence of triples or a tensor (count, 3))."""
    colors = torch.as_tensor(np.asarray(backgrounds, dtype=np.float32))
    if colors.shape == (3,):
        colors = colors.expand(count, 3)
    if colors.shape != (count, 3):
        raise ValueError(
            f"backgrounds: expected one RGB colour (0-255) or one per image ({count}, 3); got shape "
            f"{tuple(colors.shape)}"
        )
    if colors.min() < 0 or colors.max() > 255:
        raise ValueError(f"backgrounds: RGB values must be in 0-255; got {colors.min():.1f} to {colors.max():.1f}")
    return colors / 255


def _check_images(images: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a tensor (N, 3, H, W) in [0, 1]; got {shape}")
    return images.detach().float().cpu()


def shape_masks(
    images: torch.Tensor,
    backgrounds: Sequence | torch.Tensor,
    threshold: float = DISTANCE_THRESHOLD,
    relative: float = RELATIVE_THRESHOLD,
) -> torch.Tensor:
    """Boolean masks (N, H, W) of the drawn pixels of ``images`` (N, 3, H, W) in [0, 1]: those whose RGB distance to
    their image's background colour (``backgrounds``: RGB 0-255, one or one per image) is above both ``threshold``
    and ``relative`` x the image's drawn-colour distance (its ``DRAWN_QUANTILE`` of distances)."""
    images = _check_images(images, "images")
    if images.shape[1] != 3:
        raise ValueError(f"images: expected RGB images (N, 3, H, W); got {tuple(images.shape)}")
    colors = background_colors(backgrounds, len(images))
    distance = (images - colors[:, :, None, None]).norm(dim=1)
    drawn = distance.flatten(1).quantile(DRAWN_QUANTILE, dim=1)
    cut = (relative * drawn).clamp(min=threshold)
    return distance > cut[:, None, None]


def silhouettes(controls: torch.Tensor, threshold: float = SILHOUETTE_THRESHOLD) -> torch.Tensor:
    """Boolean masks (N, H, W) of the control images (N, 1 or 3, H, W) in [0, 1]: channel mean above ``threshold``."""
    return _check_images(controls, "controls").mean(dim=1) > threshold


def mask_iou(masks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image IoU of two boolean mask batches (N, H, W); 1 where both are empty (they agree)."""
    if masks.shape != targets.shape:
        raise ValueError(f"mask_iou: masks {tuple(masks.shape)} and targets {tuple(targets.shape)} differ in shape")
    inter = (masks & targets).flatten(1).sum(1).float()
    union = (masks | targets).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def control_iou(
    images: torch.Tensor,
    controls: torch.Tensor,
    backgrounds: Sequence | torch.Tensor,
    threshold: float = DISTANCE_THRESHOLD,
    relative: float = RELATIVE_THRESHOLD,
) -> torch.Tensor:
    """IoU (N,) of each image's drawn shape (``shape_masks``) with its control's silhouette (``silhouettes``).

    ``images`` (N, 3, H, W) and ``controls`` (N, 1 or 3, H, W) are in [0, 1] and of the same size (``generate``
    with ``controls`` returns samples at the controls' size); ``backgrounds``: RGB 0-255, one or one per image."""
    images, controls = _check_images(images, "images"), _check_images(controls, "controls")
    if len(images) != len(controls) or images.shape[-2:] != controls.shape[-2:]:
        raise ValueError(
            f"control_iou: images {tuple(images.shape)} and controls {tuple(controls.shape)} must have the same count "
            "and size"
        )
    return mask_iou(shape_masks(images, backgrounds, threshold, relative), silhouettes(controls))


def bootstrap_interval(
    values: Sequence[float] | torch.Tensor, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap interval, ``resamples`` resamples with replacement
    from a generator seeded by ``seed`` (the same values give the same interval). One value: the interval is that
    value; none: NaNs."""
    x = np.asarray(torch.as_tensor(values, dtype=torch.float64).flatten(), dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = x[np.random.default_rng(seed).integers(0, x.size, (resamples, x.size))].mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(x.mean()), float(low), float(high)
