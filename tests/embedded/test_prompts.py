"""Prompt fidelity in the embedded world: prompts parsed into attributes, checked by the shipped feature net.

The net is retrained from time to time: the accuracy bounds below are what any usable net meets, not its numbers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_ft.embedded import shapes  # noqa: E402
from lightning_ft.embedded.feature_net import default_feature_net  # noqa: E402
from lightning_ft.embedded.prompts import PROMPT_ATTRIBUTES, parse_prompt, prompt_accuracy  # noqa: E402

N = 200


def stream(seed: int, count: int = N, **fixed) -> tuple[torch.Tensor, list[str]]:
    specs = [shapes.spec_for_index(seed, i, **fixed) for i in range(count)]
    images = np.stack([shapes.render(s, 32) for s in specs])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, [s.caption for s in specs]


@pytest.fixture(scope="module")
def source_a():
    return stream(100)


def test_prompt_accuracy_matches_captions_and_not_shuffled_ones(source_a):
    images, captions = source_a
    assert PROMPT_ATTRIBUTES == ("shape", "color", "background")
    matched = prompt_accuracy(images, captions)
    assert set(matched) == {*PROMPT_ATTRIBUTES, *(f"n_{k}" for k in PROMPT_ATTRIBUTES)}
    assert {matched[f"n_{k}"] for k in PROMPT_ATTRIBUTES} == {N}
    # A loose bound: the net is being retrained, and any usable one reads the plain renders' captions.
    assert min(matched[k] for k in PROMPT_ATTRIBUTES) >= 0.8
    # Each image scored against its neighbour's caption: about chance (1/6, 1/8, 1/3).
    shuffled = prompt_accuracy(images, captions[1:] + captions[:1])
    assert max(shuffled[k] for k in PROMPT_ATTRIBUTES) < 0.5


def test_prompt_accuracy_is_the_agreement_of_the_nets_predictions_with_the_prompts(source_a):
    images, captions = source_a[0][:64], source_a[1][:64]
    net = default_feature_net()
    with torch.no_grad():
        predicted = net.predict(images)
    names = net.label_names
    truth = [shapes.spec_for_index(100, i) for i in range(64)]
    result = prompt_accuracy(images, captions, net=net)
    for k in PROMPT_ATTRIBUTES:
        by_hand = np.mean([names[k][int(p)] == getattr(t, k) for p, t in zip(predicted[k], truth)])
        assert result[k] == pytest.approx(by_hand, abs=1e-12)
    # Captions written from the net's own predictions are read back exactly: accuracy 1 whatever the net.
    own = [
        f"a {names['color'][int(c)]} {names['shape'][int(s)]} on a {names['background'][int(b)]} background"
        for s, c, b in zip(predicted["shape"], predicted["color"], predicted["background"])
    ]
    assert all(v == 1.0 for k, v in prompt_accuracy(images, own, net=net).items() if not k.startswith("n_"))


def test_prompt_accuracy_scores_only_the_attributes_asked_for(source_a):
    images, captions = source_a[0][:20], source_a[1][:20]
    only_shape = prompt_accuracy(images, captions, attributes=("shape",))
    assert set(only_shape) == {"shape", "n_shape"}
    assert only_shape["shape"] == prompt_accuracy(images, captions)["shape"]


def test_parse_prompt_skips_what_a_prompt_does_not_name():
    names = {"shape": list(shapes.SHAPES), "color": list(shapes.COLORS), "background": list(shapes.BACKGROUNDS)}
    assert parse_prompt("a sks star on a navy background", names) == {"shape": 3, "background": 2}
    assert parse_prompt("a red striped circle with blue stripes", names) == {"shape": 0, "color": 0}
    assert parse_prompt("two crosses on grey", names) == {"shape": 4, "background": 1}
    assert parse_prompt("a sks", names) == {}


def test_prompt_accuracy_without_named_attributes_is_nan(source_a):
    result = prompt_accuracy(source_a[0][:3], ["a sks shape"] * 3)
    assert result["n_shape"] == 0 and np.isnan(result["shape"])


def test_prompt_accuracy_checks_its_inputs(source_a):
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        prompt_accuracy(source_a[0][:3], source_a[1][:2])
    with pytest.raises(TypeError, match="ShapesFeatureNet"):
        prompt_accuracy(source_a[0][:2], source_a[1][:2], net=torch.nn.Identity())
