"""Version 5 of the feature network: the stripe-period labels and the per-head identity embedding (no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ft.embedded import shapes, targets
from lightning_ft.embedded import train_feature_net as tfn
from lightning_ft.embedded.feature_net import ShapesFeatureNet


def test_period_labels_bin_the_subjects_widths_apart():
    rng = np.random.default_rng(0)
    subject = targets.subject_spec(rng)
    period = subject.stripes[1]
    bins = [tfn.period_label(targets.subject_spec(rng, stripes=("blue", period * f))) for f in (0.5, 0.75, 1, 1.5)]
    assert len(set(bins)) == 4 and all(b >= 1 for b in bins)
    assert tfn.period_label(targets.subject_spec(rng, stripes=None)) == 0
    assert len(tfn.period_names()) == tfn.PERIOD_BINS + 1


def test_version_4_labels_and_specs_are_unchanged():
    spec = tfn.random_spec(np.random.default_rng(3))
    assert tfn.spec_labels(spec, 4) == shapes.labels(spec)
    assert tfn.random_spec(np.random.default_rng(3), 4) == spec
    assert "stripe_period" not in tfn.label_names(4) and "stripe_period" in tfn.label_names(5)
    assert "identity_heads" not in ShapesFeatureNet().config


def test_identity_heads_cosine_is_the_weighted_mean_of_block_cosines(tmp_path):
    torch.manual_seed(0)
    net = ShapesFeatureNet(label_names=tfn.label_names(5), identity_heads=tfn.IDENTITY_HEADS_V5).eval()
    x = torch.rand(6, 3, 32, 32)
    net.set_center(x)
    e = net.identity(x)
    assert e.shape == (6, net.identity_dim)
    weights = torch.tensor(list(tfn.IDENTITY_HEADS_V5.values()))
    assert torch.allclose(e.norm(dim=-1), weights.norm().expand(6), atol=1e-5)
    loaded = ShapesFeatureNet.load(net.save(tmp_path / "v5"))
    assert loaded.identity_heads == net.identity_heads
    assert torch.allclose(loaded.identity(x), e, atol=1e-6)


def test_identity_heads_reject_unknown_heads():
    with pytest.raises(ValueError, match="unknown heads"):
        ShapesFeatureNet(identity_heads={"nope": 1.0})


def test_version_5_colour_labels_name_the_colour_covering_most_of_the_shape():
    rng = np.random.default_rng(1)
    subject = targets.subject_spec(rng)
    (stripe, period), colour = subject.stripes, subject.color
    swapped = targets.subject_spec(rng, color=stripe, stripes=(colour, period))
    assert tfn.base_share(subject) > 0.5 and tfn.base_share(swapped) > 0.5
    a, b = tfn.spec_labels(subject, 5), tfn.spec_labels(swapped, 5)
    assert (a["color"], a["stripe_color"]) != (b["color"], b["stripe_color"])
    assert tfn.spec_labels(subject, 4)["color"] == a["color"]
    # Stripes that cover more than the base colour: the labels name the stripe colour as the main one.
    wide = next(
        s
        for s in (shapes.styled(shapes.sample_spec(rng), rng, True, False) for _ in range(200))
        if tfn.base_share(s) < 0.45
    )
    labels = tfn.spec_labels(wide, 5)
    assert list(shapes.COLORS)[labels["color"]] == wide.stripes[0]
    assert shapes.STRIPE_COLORS[labels["stripe_color"]] == wide.color
