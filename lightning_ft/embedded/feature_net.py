"""The embedded world's metric backbone: a small CNN trained to recognise the shapes world's attributes.

It stands in for Inception (FID/KID), DINO / CLIP-I (subject identity) and CLIP-T (prompt fidelity, read here as
attribute accuracy) for the embedded models only. ``forward`` returns a (N, D) feature vector, which is what
torchmetrics' FID/KID expect from a custom ``feature`` module; ``identity`` the centred features that subject
identity compares; ``classify`` the logits of the attribute heads (shape, colour, background, surface pattern,
stripe colour). Trained by ``python -m lightning_ft.embedded.train_feature_net``; the shipped weights live in
``lightning_ft/embedded/assets/shapes-features`` (version 4: FID/KID, attribute accuracy, ANL's condition tokens).
Version 5 (``shapes-features-v5``, ``--version 5``) adds a stripe-period head and reads identity per head
(``identity_heads``); it serves the identity role (``lightning_ft.embedded.backbones.identity``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_ft.embedded import asset_path, shapes
from lightning_ft.metrics.images import as_float_images

DEFAULT_ASSET = "shapes-features"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def default_label_names() -> dict[str, list[str]]:
    """Class names of each head, in the index order of ``shapes.labels``."""
    return {
        "shape": list(shapes.SHAPES),
        "color": list(shapes.COLORS),
        "background": list(shapes.BACKGROUNDS),
        "pattern": list(shapes.PATTERNS),
        "stripe_color": list(shapes.STRIPE_COLORS),
    }


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
        label_names: class names per head (default: the shapes, colours, backgrounds, patterns and stripe colours
            of ``lightning_ft.embedded.shapes``).
        identity_heads: how ``identity`` reads an image. ``None`` (the default, version 4): the centred features.
            A dict ``{name: weight}`` (version 5): blocks, each centred and normalised on its own and scaled by its
            weight, then joined: ``"features"`` the features, any head name that head's class probabilities. The
            cosine of two embeddings is then the weighted mean (by squared weight) of the blocks' cosines, so a
            variant that differs in one head (stripe period, base colour) loses that head's share whatever the rest.

    Attributes:
        num_features: D, read by torchmetrics FID/KID so that they need not probe the net with a dummy image.
    """

    def __init__(
        self,
        widths: tuple[int, ...] | list[int] = (16, 32, 64, 128, 128),
        num_features: int = 128,
        label_names: dict[str, list[str]] | None = None,
        identity_heads: dict[str, float] | None = None,
    ):
        super().__init__()
        self.config = {
            "widths": list(widths),
            "num_features": int(num_features),
            "label_names": {k: list(v) for k, v in (label_names or default_label_names()).items()},
        }
        if identity_heads is not None:
            unknown = set(identity_heads) - set(self.config["label_names"]) - {"features"}
            if unknown:
                raise ValueError(f"identity_heads names unknown heads {sorted(unknown)}")
            # Saved only when set, so that a version-4 folder's config (and state dict) stays as it was.
            self.config["identity_heads"] = {k: float(v) for k, v in identity_heads.items()}
        self.identity_heads = self.config.get("identity_heads")
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
        # The mean feature of the world's images (set after training by ``set_center``): subtracted before
        # ``identity`` compares images, so that a cosine measures what sets an image apart from the world's average
        # and not what every image of the world shares (raw features of any two renders are alike by cosine).
        self.register_buffer("center", torch.zeros(num_features))
        if self.identity_heads is not None:
            # The mean class probabilities of each identity head over the world (set by ``set_center`` too).
            size = sum(len(self.label_names[k]) for k in self.identity_heads if k != "features")
            self.register_buffer("head_center", torch.zeros(size))

    def forward(self, x: Tensor) -> Tensor:
        """Feature vectors (N, D) of images (float in [0, 1] or uint8; (N, 3, H, W) or one (3, H, W))."""
        x = as_float_images(x).to(self.project.weight.device)
        h = self.trunk(x * 2.0 - 1.0)
        return self.project(self.pool(h).flatten(1))

    def identity(self, x: Tensor) -> Tensor:
        """Identity embeddings (N, D'), the DINO role. Cosine similarity of two embeddings is high for the same
        object (shape, colour, surface pattern) in any pose or size and low for another object of the same class;
        see the model card for the measured levels. Version 4: the features minus the world's mean feature
        (D' = D); with ``identity_heads``: the weighted, per-block normalised blocks described there."""
        features = self.forward(x)
        if self.identity_heads is None:
            return features - self.center
        return self._identity_blocks(features)

    def _head_probabilities(self, features: Tensor) -> Tensor:
        heads = [k for k in self.identity_heads if k != "features"]
        return torch.cat([self.heads[k](features).softmax(-1) for k in heads], dim=-1)

    def _identity_blocks(self, features: Tensor) -> Tensor:
        blocks, start = [], 0
        probabilities = self._head_probabilities(features) - self.head_center
        for name, weight in self.identity_heads.items():
            if name == "features":
                block = features - self.center
            else:
                size = len(self.label_names[name])
                block, start = probabilities[:, start : start + size], start + size
            blocks.append(weight * torch.nn.functional.normalize(block, dim=-1))
        return torch.cat(blocks, dim=-1)

    @torch.no_grad()
    def set_center(self, images: Tensor, batch_size: int = 500) -> None:
        """Set ``center`` to the mean feature of ``images`` (a broad sample of the world), and with
        ``identity_heads`` ``head_center`` to their mean class probabilities."""
        feats = torch.cat([self.forward(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        self.center.copy_(feats.mean(dim=0))
        if self.identity_heads is not None:
            self.head_center.copy_(self._head_probabilities(feats).mean(dim=0))

    @property
    def identity_dim(self) -> int:
        """Size of the ``identity`` embedding."""
        if self.identity_heads is None:
            return self.num_features
        return sum(self.num_features if k == "features" else len(self.label_names[k]) for k in self.identity_heads)

    def classify(self, x: Tensor) -> dict[str, Tensor]:
        """Logits per attribute head, e.g. ``{"shape": (N, 6), "color": (N, 8), "background": (N, 3), ...}``."""
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
    """The shipped net from ``lightning_ft/embedded/assets/shapes-features`` (frozen); a clear error if missing."""
    return ShapesFeatureNet.load(asset_path(DEFAULT_ASSET), device=device)
