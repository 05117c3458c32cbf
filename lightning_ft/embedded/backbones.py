"""The embedded models' metric backbones, as factories that a model folder names in its ``lightning_ft.json``.

The framework never imports this module: ``lightning_ft.metrics.make_backbone("lightning_ft.embedded.backbones:NAME")``
calls a factory here by its dotted name, the same way it would call a user's own. Each factory takes an optional
folder and returns a frozen ``FeatureExtractor``:

- ``identity``: the identity embedding of the version-5 feature network (``shapes-features-v5``:
  ``ShapesFeatureNet.identity``, separately normalised blocks of features and attribute heads, stripe period among
  them), the DINO role: subject identity, memorisation and diversity compare these by cosine. Version 4's centred
  features could not tell the subject from its swapped-colour or half-width-stripe variants
  (``benchmarks/results/identity_decoys.md``).
- ``features``: the raw features of the version-4 network (``shapes-features``), the Inception role for FID/KID;
  kept on version 4 so that every FID measured so far stays comparable (version 5 was made for identity).
- ``condition_tokens``: its last feature map as tokens (ANL's image condition, the CLIP-token role).

``declaration()`` is what the embedded models' folders hold in ``lightning_ft.json``.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_ft.embedded import asset_path
from lightning_ft.embedded.feature_net import ShapesFeatureNet, default_feature_net
from lightning_ft.metrics.backbones import FeatureExtractor

MODULE = "lightning_ft.embedded.backbones"


#: The shipped feature network that serves the identity role (``features`` and ``condition_tokens``: the default one).
IDENTITY_ASSET = "shapes-features-v5"


def load_net(path: str | None = None) -> ShapesFeatureNet:
    """The feature network saved in ``path`` (default: the shipped ``shapes-features``), frozen."""
    return ShapesFeatureNet.load(path) if path else default_feature_net()


class _Identity(nn.Module):
    def __init__(self, net: ShapesFeatureNet):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.identity(x)


def identity(path: str | None = None) -> FeatureExtractor:
    """Identity embeddings of the embedded world (subject identity, memorisation, diversity); default network:
    ``shapes-features-v5``."""
    net = load_net(path or str(asset_path(IDENTITY_ASSET)))
    name = "shapes-identity-v5" if net.identity_heads else "shapes-identity"  # version 4's centred features
    return FeatureExtractor(_Identity(net), net.identity_dim, name)


def features(path: str | None = None) -> FeatureExtractor:
    """The feature network's features (FID / KID of the embedded world)."""
    net = load_net(path)
    return FeatureExtractor(net, net.num_features, "shapes-features")


class ConditionTokens(nn.Module):
    """Condition tokens from the feature network: its last feature map, one token per position (32x32 images ->
    16 tokens of width 128); the stand-in for CLIP image tokens. Takes images in [-1, 1], as ANL passes them."""

    def __init__(self, net: ShapesFeatureNet):
        super().__init__()
        self.net = net
        self.dim = net.trunk[-1][0].out_channels

    def forward(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> tokens (B, L, D)."""
        return self.net.trunk(images.to(self.net.project.weight.dtype)).flatten(2).transpose(1, 2)


def condition_tokens(path: str | None = None) -> nn.Module:
    """ANL's image-condition encoder for the embedded models (frozen, with a ``dim`` attribute)."""
    return ConditionTokens(load_net(path)).eval().requires_grad_(False)


def declaration() -> dict:
    """The ``lightning_ft.json`` of an embedded model folder: which backbone serves which role."""
    return {
        "backbones": {
            "identity": {"name": f"{MODULE}:identity"},
            "fid": {"name": f"{MODULE}:features"},
            "condition": {"name": f"{MODULE}:condition_tokens"},
        }
    }
