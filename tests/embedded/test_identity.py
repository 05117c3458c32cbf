"""Subject identity on the embedded world (the DINO role): the shipped identity embedding tells the few-shot subject
from plain members of its class, survives the shipped autoencoder, and a perfect copy reaches the ceiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_ft.core import DiffusionBase
from lightning_ft.embedded import asset_path, shapes, targets
from lightning_ft.embedded.backbones import identity
from lightning_ft.embedded.feature_net import default_feature_net
from lightning_ft.metrics import features, memorisation, subject_fidelity


def render(specs) -> torch.Tensor:
    return torch.from_numpy(np.stack([shapes.render(s) for s in specs])).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng((3, 1))
    instances = render([targets.subject_spec(rng) for _ in range(5)])
    heldout = render([targets.subject_spec(rng) for _ in range(48)])
    plain = render([targets.subject_spec(rng, stripes=None) for _ in range(48)])
    return identity(), instances, heldout, plain


@pytest.fixture(scope="module")
def model():
    return DiffusionBase(pretrained=str(asset_path("shapes-t2i")))


def score(backbone, images, instances) -> float:
    return subject_fidelity(features(images, backbone), features(instances, backbone))


def test_subject_renders_score_near_the_top_and_plain_renders_of_its_class_far_below(world):
    backbone, instances, heldout, plain = world
    subject, cls = score(backbone, heldout, instances), score(backbone, plain, instances)
    assert subject > 0.85
    assert subject - cls >= 0.3  # the requirement: the class prior is not the subject


def test_every_trait_of_the_subject_counts(world):
    """Same stripes on another shape, or another stripe colour on the same star, score below the subject itself."""
    backbone, instances, heldout, _ = world
    rng = np.random.default_rng((3, 2))
    subject = score(backbone, heldout, instances)
    other_shape = render([targets.subject_spec(rng, shape="circle") for _ in range(48)])
    other_stripes = render(
        [targets.subject_spec(rng, stripes=("purple", targets.SUBJECT["stripes"][1])) for _ in range(48)]
    )
    assert score(backbone, other_shape, instances) < subject - 0.1
    assert score(backbone, other_stripes, instances) < subject - 0.05


def test_the_autoencoder_round_trip_keeps_the_subject(world, model):
    """The ceiling: held-out subject renders through the shipped autoencoder still score near the renders and far
    above the class, and the feature network still sees a striped star."""
    backbone, instances, heldout, plain = world
    trip = model.round_trip(heldout)
    ceiling = score(backbone, trip, instances)
    assert ceiling > score(backbone, plain, instances) + 0.3
    assert ceiling > score(backbone, heldout, instances) - 0.1
    predicted = default_feature_net().predict(trip)  # the attribute reader (the CLIP-T role)
    assert (predicted["shape"] == shapes.SHAPES.index("star")).float().mean() >= 0.9
    assert (predicted["pattern"] == shapes.PATTERNS.index("striped")).float().mean() >= 0.9


def test_a_memorised_sample_scores_the_ceiling(world, model):
    """Copies of the instance images through the autoencoder (what a fully memorised model draws) score at the
    ceiling's level, far above the class. The identity embedding ignores pose (flips, turns, position), as it should
    for identity, so it does not tell a copy from a new pose of the subject: nearest-instance similarity is high for
    both."""
    backbone, instances, heldout, plain = world
    copies = model.round_trip(instances)
    ceiling = score(backbone, model.round_trip(heldout), instances)
    assert score(backbone, copies, instances) == pytest.approx(ceiling, abs=0.05)
    assert score(backbone, copies, instances) > score(backbone, plain, instances) + 0.3
    ref = features(instances, backbone)
    assert memorisation(features(copies, backbone), ref) > memorisation(features(plain, backbone), ref) + 0.3
