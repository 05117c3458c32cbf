"""The embedded world's metric backbone: a small CNN trained to recognise the shapes world's attributes.

It stands in for Inception (FID/KID), DINO / CLIP-I (subject fidelity) and CLIP-T (prompt fidelity, read here as
attribute accuracy) when no hub weights are available. ``forward`` returns a (N, D) feature vector, which is what
torchmetrics' FID/KID expect from a custom ``feature`` module; ``classify`` returns logits of the three attribute
heads. Trained by ``python -m lightning_ft.metrics.train_feature_net``; the shipped weights live in
``lightning_ft/assets/shapes-features``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_ft.data import shapes
from lightning_ft.paths import asset_path

DEFAULT_ASSET = "shapes-features"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def default_label_names() -> dict[str, list[str]]:
    """Class names of each head, in the index order of ``shapes.labels``."""
    return {"shape": list(shapes.SHAPES), "color": list(shapes.COLORS), "background": list(shapes.BACKGROUNDS)}


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


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: a metric must give an image the same features whatever the batch and
    # whatever train()/eval() mode a parent module (e.g. a torchmetrics Metric inside a LightningModule) sets.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(8, c_out // 4), c_out),
        nn.SiLU(),
    )


class ShapesFeatureNet(nn.Module):
    """A small CNN over float images in [0, 1] (N, 3, H, W), any H = W >= 16 (adaptive pooling; trained at 32).

    Args:
        widths: channels of the conv blocks (default (16, 32, 64, 128, 128)); the first block keeps the full
            resolution, the next three halve it, the rest keep it.
        num_features: size D of the feature vector returned by ``forward`` (default 128).
        label_names: class names per head (default: shapes, colours and backgrounds of ``lightning_ft.data.shapes``).

    Attributes:
        num_features: D, read by torchmetrics FID/KID so that they need not probe the net with a dummy image.
    """

    def __init__(
        self,
        widths: tuple[int, ...] | list[int] = (16, 32, 64, 128, 128),
        num_features: int = 128,
        label_names: dict[str, list[str]] | None = None,
    ):
        super().__init__()
        self.config = {
            "widths": list(widths),
            "num_features": int(num_features),
            "label_names": {k: list(v) for k, v in (label_names or default_label_names()).items()},
        }
        self.num_features = int(num_features)
        self.label_names = self.config["label_names"]
        blocks, c_in = [], 3
        for i, c_out in enumerate(widths):
            blocks.append(_conv_block(c_in, c_out, stride=2 if 1 <= i <= 3 else 1))
            c_in = c_out
        self.trunk = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        # A linear projection with no activation after it: ReLU features would all be non-negative and every
        # pair of images would look alike by cosine similarity.
        self.project = nn.Linear(c_in, num_features)
        self.heads = nn.ModuleDict({k: nn.Linear(num_features, len(names)) for k, names in self.label_names.items()})

    def forward(self, x: Tensor) -> Tensor:
        """Feature vectors (N, D) of images (float in [0, 1] or uint8; (N, 3, H, W) or one (3, H, W))."""
        x = as_float_images(x).to(self.project.weight.device)
        h = self.trunk(x * 2.0 - 1.0)
        return self.project(self.pool(h).flatten(1))

    def classify(self, x: Tensor) -> dict[str, Tensor]:
        """Logits per attribute head: ``{"shape": (N, 6), "color": (N, 8), "background": (N, 3)}``."""
        features = self.forward(x)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: Tensor) -> dict[str, Tensor]:
        """Predicted class index per attribute, (N,) long tensors."""
        return {name: logits.argmax(-1) for name, logits in self.classify(x).items()}

    def save(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created if missing); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps({"class": type(self).__name__, **self.config}, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ShapesFeatureNet:
        """Rebuild a net saved by ``save`` from ``folder``; returned frozen (eval mode, no gradients)."""
        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        config.pop("class", None)
        net = cls(**config)
        net.load_state_dict(load_file(str(folder / WEIGHTS_NAME), device="cpu"))
        return net.to(device).eval().requires_grad_(False)


def default_feature_net(device: str | torch.device = "cpu") -> ShapesFeatureNet:
    """The shipped net from ``lightning_ft/assets/shapes-features`` (frozen); a clear error if it is missing."""
    return ShapesFeatureNet.load(asset_path(DEFAULT_ASSET), device=device)
