"""Swappable feature extractors for the scores: the embedded shapes net, Inception (torch-fidelity) or a local CLIP.

Every backbone is wrapped as a ``FeatureExtractor``: float images in [0, 1], (N, 3, H, W) in, (N, D) features out,
frozen, with a ``num_features`` attribute so that torchmetrics' FID/KID accept it as a custom ``feature`` module.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ft.metrics.feature_net import ShapesFeatureNet, as_float_images, default_feature_net

BACKBONES = ("shapes", "inception", "clip")
# The normalisation CLIP was trained with (OpenAI CLIP), used when a checkpoint has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FeatureExtractor(nn.Module):
    """A frozen image -> feature module: float images in [0, 1] (or uint8), (N, 3, H, W) -> (N, D) float32.

    Args:
        module: maps prepared float images (N, 3, H, W) in [0, 1] to (N, D) features.
        num_features: D.
        name: backbone name, logged beside scores so that numbers from different backbones are never compared.

    It stays in eval mode whatever ``train()`` is called with: as a submodule of a torchmetrics Metric inside a
    LightningModule it would otherwise be switched to training mode with its parent.
    """

    def __init__(self, module: nn.Module, num_features: int, name: str):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.num_features = int(num_features)
        self.name = name

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def forward(self, images: Tensor) -> Tensor:
        x = as_float_images(images).to(self.device)
        with torch.no_grad():
            return self.module(x).float().flatten(1)

    def extract(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Features of ``images`` computed ``batch_size`` at a time, (N, D) float32 on the backbone's device."""
        if len(images) == 0:
            return torch.zeros(0, self.num_features, device=self.device)
        return torch.cat([self(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


class _InceptionUint8(nn.Module):
    """torchmetrics' torch-fidelity Inception takes uint8 in [0, 255] and resizes to 299 itself."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, x: Tensor) -> Tensor:
        return self.inception((x * 255).round().to(torch.uint8))


def clip_normalisation(folder: str | Path) -> tuple[tuple, tuple]:
    """(mean, std) of a local CLIP checkpoint: its ``preprocessor_config.json`` when present, else OpenAI CLIP's."""
    config = Path(folder) / "preprocessor_config.json"
    if not config.exists():
        return CLIP_MEAN, CLIP_STD
    pre = json.loads(config.read_text())
    return tuple(pre.get("image_mean", CLIP_MEAN)), tuple(pre.get("image_std", CLIP_STD))


class CLIPPreprocess(nn.Module):
    """Images in [0, 1] (N, 3, H, W) -> CLIP pixel values: antialiased bicubic resize to ``image_size``, then
    normalise by ``mean`` / ``std`` (shared by the CLIP metric backbone and ANL's CLIP condition encoder)."""

    def __init__(self, image_size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD):
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        return (x - self.mean) / self.std


class _CLIPImageEmbeds(nn.Module):
    """CLIP-preprocess, return the projected image embeddings (N, projection_dim)."""

    def __init__(self, model: nn.Module, preprocess: CLIPPreprocess):
        super().__init__()
        self.model, self.preprocess = model, preprocess

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(pixel_values=self.preprocess(x))
        # transformers 5 returns output objects, not tensors: take the projected embeddings when the model has a
        # projection, else the pooled output.
        embeds = getattr(out, "image_embeds", None)
        return embeds if embeds is not None else out.pooler_output


def _shapes(path: str | None) -> FeatureExtractor:
    net = ShapesFeatureNet.load(path) if path else default_feature_net()
    return FeatureExtractor(net, net.num_features, "shapes")


def _inception(path: str | None) -> FeatureExtractor:
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError(
            "the 'inception' backbone needs torch-fidelity (pip install torch-fidelity) and downloads its Inception "
            "weights on first use; offline, use backbone 'shapes' or a local 'clip' checkpoint"
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    inception = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path
    )
    return FeatureExtractor(_InceptionUint8(inception), 2048, "inception")


def _clip(path: str | None) -> FeatureExtractor:
    if not path:
        raise ValueError("the 'clip' backbone needs path: a local CLIP checkpoint folder (save_pretrained output)")
    from transformers import CLIPVisionModelWithProjection

    folder = Path(path)
    model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
    config = model.config
    preprocess = CLIPPreprocess(config.image_size, *clip_normalisation(folder))
    dim = getattr(config, "projection_dim", None) or config.hidden_size
    return FeatureExtractor(_CLIPImageEmbeds(model, preprocess), dim, "clip")


def make_backbone(
    name: str = "shapes", path: str | Path | None = None, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """A frozen feature extractor by name.

    Args:
        name: ``"shapes"`` (default: the embedded ``ShapesFeatureNet``), ``"inception"`` (torchmetrics' FID
            Inception; needs torch-fidelity and its downloaded weights) or ``"clip"`` (image embeddings of a local
            CLIP vision checkpoint).
        path: for ``"shapes"`` a folder saved by ``ShapesFeatureNet.save`` (default: the shipped asset); for
            ``"clip"`` the local checkpoint folder (required; the hub is never contacted); for ``"inception"`` an
            optional local weights file.
        device: where the backbone runs (default ``"cpu"``).
    """
    builders = {"shapes": _shapes, "inception": _inception, "clip": _clip}
    if name not in builders:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    return builders[name](None if path is None else str(path)).to(device)


def as_backbone(backbone: nn.Module | str | None) -> FeatureExtractor:
    """``backbone`` as a ``FeatureExtractor``: None -> the shapes net, a name -> ``make_backbone(name)``, a bare
    module with ``num_features`` (e.g. a ``ShapesFeatureNet``) -> wrapped, which freezes that module in place."""
    if backbone is None or isinstance(backbone, str):
        return make_backbone(backbone or "shapes")
    if isinstance(backbone, FeatureExtractor):
        return backbone
    if not hasattr(backbone, "num_features"):
        raise TypeError("a backbone module needs a num_features attribute (its feature size D)")
    return FeatureExtractor(backbone, backbone.num_features, type(backbone).__name__)
