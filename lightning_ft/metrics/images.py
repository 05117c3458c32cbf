"""Image conventions shared by every score and backbone."""

from __future__ import annotations

import torch
from torch import Tensor


def as_float_images(x: Tensor) -> Tensor:
    """Images as float (N, 3, H, W) in [0, 1]: uint8 is divided by 255, a single CHW image gets a batch axis.

    Float input outside [0, 1] by more than rounding raises, because the usual cause is a [-1, 1] sample passed
    unconverted, which would silently shift every score."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    x = x.float()
    if x.numel() and (x.min() < -0.05 or x.max() > 1.05):
        raise ValueError(
            f"expected float images in [0, 1], got values in [{x.min().item():.3f}, {x.max().item():.3f}]; "
            "convert [-1, 1] samples with (x + 1) / 2"
        )
    return x.clamp(0.0, 1.0)
