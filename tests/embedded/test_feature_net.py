"""The shapes feature net: shapes of its outputs, save/load, input checks, the shipped asset, torchmetrics use."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: E402

from lightning_ft.embedded import (
    ASSETS_DIR,  # noqa: E402
    shapes,  # noqa: E402
)
from lightning_ft.embedded.feature_net import ShapesFeatureNet, default_feature_net  # noqa: E402
from lightning_ft.metrics import FeatureExtractor, fid_kid  # noqa: E402


def renders(seed: int, count: int, resolution: int = 32) -> torch.Tensor:
    images = np.stack([shapes.render(shapes.spec_for_index(seed, i), resolution) for i in range(count)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture
def random_net() -> ShapesFeatureNet:
    torch.manual_seed(0)
    return ShapesFeatureNet().eval()


def test_outputs_and_resolutions(random_net):
    x = renders(0, 4)
    assert random_net(x).shape == (4, random_net.num_features) == (4, 128)
    assert random_net(renders(0, 2, resolution=64)).shape == (2, 128)
    logits = random_net.classify(x)
    assert {k: v.shape[-1] for k, v in logits.items()} == {
        "shape": 6, "color": 8, "background": 3, "pattern": 4, "stripe_color": 9
    }  # fmt: skip
    # uint8 input is read as [0, 255].
    as_uint8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(random_net(as_uint8), random_net(x), atol=1e-5, rtol=1e-5)


def test_features_do_not_depend_on_the_batch_or_mode(random_net):
    x = renders(1, 6)
    alone = random_net(x[:2])
    random_net.train()
    torch.testing.assert_close(random_net(x)[:2], alone, atol=1e-5, rtol=1e-5)
    wrapped = FeatureExtractor(random_net, 128, "shapes")
    wrapped.train()
    assert not wrapped.training and not random_net.training


def test_rejects_images_in_minus_one_one(random_net):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        random_net(renders(0, 2) * 2 - 1)


def test_save_load_round_trip(random_net, tmp_path):
    x = renders(2, 8)
    random_net.set_center(renders(5, 16))
    assert random_net.center.abs().sum() > 0
    folder = random_net.save(tmp_path / "net")
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    loaded = ShapesFeatureNet.load(folder)
    assert torch.equal(loaded(x), random_net(x))
    # The identity centre is saved with the weights: identity embeddings survive the round trip.
    assert torch.equal(loaded.identity(x), random_net.identity(x))
    torch.testing.assert_close(loaded.identity(x), loaded(x) - random_net.center)
    for k, v in random_net.classify(x).items():
        assert torch.equal(loaded.classify(x)[k], v)
    assert loaded.label_names == random_net.label_names
    assert not any(p.requires_grad for p in loaded.parameters())


def test_shipped_asset_is_small_and_accurate():
    folder = ASSETS_DIR / "shapes-features"
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 2 * 1024 * 1024
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["heldout"]["count"] >= 2000
    assert min(metrics["heldout"]["accuracy"].values()) >= 0.98
    net = default_feature_net()
    assert net.num_features == 128
    assert 100_000 <= sum(p.numel() for p in net.parameters()) <= 300_000


def test_net_works_directly_as_torchmetrics_feature():
    """torchmetrics may be handed the net itself; it must agree with fid_kid's extract-once route."""
    net = default_feature_net()
    real, fake = renders(3, 64), renders(4, 64)
    fid = FrechetInceptionDistance(feature=net, normalize=True)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    direct = float(fid.compute())
    assert direct > 0
    assert fid_kid(real, fake, net, kid_subsets=2)["fid"] == pytest.approx(direct, rel=1e-3)
