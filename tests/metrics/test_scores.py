"""Scores on renders of the shapes world, judged by the embedded feature net's backbones (loaded by their dotted
factory names, as a model folder declares them). The net is retrained from time to time: nothing here depends on
its exact numbers."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_ft.embedded import shapes  # noqa: E402
from lightning_ft.metrics import (  # noqa: E402
    FIDScorer,
    diversity,
    features,
    fid_kid,
    high_frequency_energy,
    make_backbone,
    memorisation,
    subject_fidelity,
)
from lightning_ft.metrics.backbones import DEFAULT_CHECKPOINTS  # noqa: E402

N = 200


def render_specs(specs: list[shapes.ShapeSpec], resolution: int = 32) -> torch.Tensor:
    images = np.stack([shapes.render(s, resolution) for s in specs])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def stream(seed: int, count: int = N, **fixed) -> tuple[torch.Tensor, list[str]]:
    specs = [shapes.spec_for_index(seed, i, **fixed) for i in range(count)]
    return render_specs(specs), [s.caption for s in specs]


@pytest.fixture(scope="module")
def backbone():
    """The FID role of the embedded world: the feature net's raw features."""
    return make_backbone("lightning_ft.embedded.backbones:features")


@pytest.fixture(scope="module")
def identity():
    """The DINO role of the embedded world: the feature net's centred identity embeddings."""
    return make_backbone("lightning_ft.embedded.backbones:identity")


@pytest.fixture(scope="module")
def source_a():
    return stream(100)


@pytest.fixture(scope="module")
def source_b():
    return stream(101)[0]


def test_fid_of_a_set_with_itself_is_zero_and_outlines_are_far(backbone, source_a, source_b):
    a = source_a[0]
    outlined = stream(102, outline=0.35)[0]
    same = fid_kid(a, a, backbone, kid_subsets=5)
    disjoint = fid_kid(a, source_b, backbone, kid_subsets=5)
    shifted = fid_kid(a, outlined, backbone, kid_subsets=5)
    assert same["n_real"] == same["n_fake"] == N
    # Identical sets: only the eigenvalue round-off of the matrix square root remains.
    assert abs(same["fid"]) < 1e-5 * disjoint["fid"]
    assert disjoint["fid"] > 0
    assert shifted["fid"] > 2 * disjoint["fid"]
    assert shifted["kid_mean"] > 3 * max(disjoint["kid_mean"], 1e-4)


def test_fid_scorer_reuses_the_reference_and_keeps_the_global_rng(backbone, source_a, source_b):
    a = source_a[0]
    scorer = FIDScorer(backbone, kid_subset_size=50, kid_subsets=5).set_reference(a)
    state = torch.get_rng_state()
    first, second = scorer.score(source_b), scorer.score(source_b)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == second
    assert first["fid"] == pytest.approx(fid_kid(a, source_b, backbone, kid_subsets=5)["fid"], rel=1e-9)
    # Features in place of images give the same score.
    assert scorer.score(backbone.extract(source_b)) == first
    with pytest.raises(ValueError, match="at least 2"):
        scorer.score(source_b[:1])


@pytest.mark.parametrize("role", ["identity", "backbone"])
def test_subject_fidelity_and_memorisation(role, request):
    backbone = request.getfixturevalue(role)
    # A patterned subject, as the embedded one: the version-5 identity embedding is pose-invariant by design, so new
    # poses of a plain red star come within 5e-4 of copies (0.9995); a striped star's new poses stay below 0.995.
    look = {"shape": "star", "color": "red", "stripes": ("blue", 0.24)}
    subject = render_specs([shapes.spec_for_index(5, i, **look) for i in range(8)])
    same_subject = render_specs([shapes.spec_for_index(6, i, **look) for i in range(8)])
    other = render_specs([shapes.spec_for_index(7, i, shape="circle", color="blue") for i in range(8)])
    assert subject_fidelity(subject[:1], subject[:1], backbone) == pytest.approx(1.0, abs=1e-5)
    # A set of distinct references is not identical to itself on average, but each image is its own nearest one.
    assert subject_fidelity(subject, subject, backbone) < 1 - 1e-3
    assert memorisation(subject, subject, backbone) == pytest.approx(1.0, abs=1e-5)
    assert subject_fidelity(same_subject, subject, backbone) > subject_fidelity(other, subject, backbone) + 0.1
    assert memorisation(same_subject, subject, backbone) < 1 - 1e-3


@pytest.mark.parametrize("role", ["identity", "backbone"])
def test_diversity(role, source_a, request):
    backbone = request.getfixturevalue(role)
    image = source_a[0][:1]
    assert diversity(image.repeat(5, 1, 1, 1), backbone) == pytest.approx(0.0, abs=1e-6)
    assert diversity(image, backbone) == 0.0
    assert diversity(source_a[0][:16], backbone) > 0.1


def test_high_frequency_energy_flags_noise(source_a):
    clean = source_a[0][:32]
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    e_clean, e_noisy = high_frequency_energy(clean), high_frequency_energy(noisy)
    assert e_clean.shape == (32,)
    assert bool((e_noisy > e_clean).all())
    assert float(e_clean.max()) < 0.3
    white = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert float(high_frequency_energy(white).mean()) == pytest.approx(0.8, abs=0.05)
    assert high_frequency_energy(torch.full((2, 3, 32, 32), 0.5)).tolist() == [0.0, 0.0]


def test_scores_of_images_need_a_backbone(identity, source_a):
    images = source_a[0][:4]
    for score in (
        lambda: subject_fidelity(images, images),
        lambda: memorisation(images, images),
        lambda: diversity(images),
        lambda: features(images),
        lambda: subject_fidelity(identity.extract(images), images),  # one set of images is enough to need one
    ):
        with pytest.raises(ValueError, match="need a backbone"):
            score()
    # Features computed beforehand need none, and score as the images do.
    feats = identity.extract(images)
    assert features(feats) is feats
    assert subject_fidelity(feats, feats) == pytest.approx(subject_fidelity(images, images, identity), abs=1e-6)
    assert memorisation(feats[:2], feats) == pytest.approx(memorisation(images[:2], images, identity), abs=1e-6)
    assert diversity(feats) == pytest.approx(diversity(images, identity), abs=1e-6)


def test_backbone_errors():
    with pytest.raises(ValueError, match="unknown backbone 'shapes'"):
        make_backbone("shapes")  # the embedded net is a factory now, never a framework name
    # The paper backbones are known; offline, their default hub checkpoints cannot load, and the error says which.
    for name in ("dino", "clip"):
        with pytest.raises(OSError, match=f"{name} backbone from '{DEFAULT_CHECKPOINTS[name]}'"):
            make_backbone(name)
    if importlib.util.find_spec("torch_fidelity") is None:
        with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
            make_backbone("inception")


def test_clip_backbone_from_a_local_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    clip = make_backbone("clip", tmp_path / "clip")
    images = stream(8, 6)[0]
    feats = clip.extract(images)
    assert feats.shape == (6, 16) and clip.num_features == 16 and clip.name == "clip"
    assert diversity(images, clip) > 0
