"""The embedded world: deterministic renderer, tokenizer round trip, few-shot targets as plain folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from lightning_ft.core.tokenizer import build_word_tokenizer
from lightning_ft.data import LimitedDataModule
from lightning_ft.embedded import shapes
from lightning_ft.embedded.datamodule import ShapesDataset
from lightning_ft.embedded.feature_net import default_feature_net
from lightning_ft.embedded.targets import SUBJECT_PROMPT, ensure_target


def test_renderer_is_deterministic_by_seed_and_index():
    a = [shapes.render(shapes.spec_for_index(3, i)) for i in range(5)]
    b = [shapes.render(shapes.spec_for_index(3, i)) for i in range(5)]
    c = [shapes.render(shapes.spec_for_index(4, i)) for i in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert torch.equal(ShapesDataset(10, seed=3)[2]["pixel_values"], ShapesDataset(10, seed=3)[2]["pixel_values"])


def test_render_draws_the_requested_colours_in_the_right_places():
    spec = shapes.ShapeSpec("square", "red", "navy", size=0.4, cx=0.5, cy=0.5, angle=0.0)
    image = shapes.render(spec, 32)
    assert tuple(image[16, 16]) == shapes.COLORS["red"]
    assert tuple(image[0, 0]) == shapes.BACKGROUNDS["navy"]
    ring = shapes.render(shapes.ShapeSpec("ring", "white", "black", 0.4, 0.5, 0.5, 0.0), 32)
    assert tuple(ring[16, 16]) == shapes.BACKGROUNDS["black"]  # the hole
    assert spec.caption == "a red square on a navy background"
    assert shapes.labels(spec) == {"shape": 1, "color": 0, "background": 2, "pattern": 0, "stripe_color": 0}
    striped = shapes.ShapeSpec(**{**spec.__dict__, "stripes": ("blue", 0.2), "outline": 0.3})
    assert shapes.labels(striped)["pattern"] == shapes.PATTERNS.index("striped-outlined")
    assert shapes.labels(striped)["stripe_color"] == shapes.STRIPE_COLORS.index("blue")


def test_every_shape_renders_a_distinct_mask_of_sensible_area():
    masks = {s: shapes.shape_mask(shapes.ShapeSpec(s, "red", "gray", 0.4, 0.5, 0.5, 0.3), 32) for s in shapes.SHAPES}
    for name, mask in masks.items():
        assert 0.05 < mask.mean() < 0.6, name
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(masks[a] - masks[b]).mean() > 0.02, (a, b)


def test_tokenizer_round_trips_through_autotokenizer(tmp_path):
    tokenizer = build_word_tokenizer(shapes.vocabulary(), model_max_length=16)
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "a sks star on a gray background"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text
    assert loaded.convert_tokens_to_ids("sks") != loaded.unk_token_id
    assert loaded("a dragon").input_ids[2] == loaded.unk_token_id
    with pytest.raises(TypeError, match="booleans"):
        build_word_tokenizer(["a", True])


def test_reserved_tokens_never_appear_in_source_captions():
    captions = {shapes.spec_for_index(0, i).caption for i in range(2000)}
    assert not any(token in caption.split() for caption in captions for token in shapes.RESERVED_TOKENS)


def test_targets_are_plain_folders_written_once(tmp_path):
    subject = ensure_target("subject", tmp_path)
    stamp = (subject / "train" / "subject_00.png").stat().st_mtime_ns
    assert ensure_target("subject", tmp_path) == subject
    assert (subject / "train" / "subject_00.png").stat().st_mtime_ns == stamp
    meta = json.loads((subject / "meta.json").read_text())
    assert meta["instance_prompts"][0] == SUBJECT_PROMPT
    # Each image is captioned with its own background (.txt beside it), on gray and black in turn.
    data = LimitedDataModule(str(subject / "train"), resolution=32, repeats=1)
    data.setup("fit")
    assert 3 <= len(data.dataset) <= 6
    assert set(data.dataset.prompts) == set(meta["instance_prompts"]) == {
        "a sks orange star on a gray background", "a sks orange star on a black background"}
    net = default_feature_net()
    for image, prompt in zip(sorted((subject / "train").glob("*.png")), data.dataset.prompts):
        pixels = torch.from_numpy(np.asarray(Image.open(image))).permute(2, 0, 1)[None].float() / 255
        background = net.label_names["background"][int(net.predict(pixels)["background"])]
        assert f"on a {background} background" in prompt, image.name

    domain = ensure_target("domain", tmp_path)
    heldout = list((domain / "heldout").glob("*.png"))
    assert len(heldout) >= 2000
    data = LimitedDataModule(
        str(domain / "train"), captions_file=str(domain / "train" / "captions.jsonl"), resolution=32, repeats=1
    )
    data.setup("fit")
    assert 10 <= len(data.dataset) <= 100
    assert all("outlined" in p for p in data.dataset.prompts)
    # Each row's class (shape x colour) agrees with its caption, for class-conditional models.
    names = [shapes.class_name(label).split() for label in data.dataset.labels]
    assert all(f"a {color} outlined {shape} on" in p for (color, shape), p in zip(names, data.dataset.prompts))
    with pytest.raises(ValueError, match="unknown embedded target"):
        ensure_target("dragons", tmp_path)


def test_styled_fraction_mixes_in_striped_and_outlined_renders_deterministically():
    plain = ShapesDataset(400, seed=1)
    mixed = ShapesDataset(400, seed=1, styled_fraction=0.5)
    changed = [not torch.equal(plain[i]["pixel_values"], mixed[i]["pixel_values"]) for i in range(400)]
    assert 0.35 < sum(changed) / 400 < 0.65
    assert torch.equal(mixed[7]["pixel_values"], ShapesDataset(400, seed=1, styled_fraction=0.5)[7]["pixel_values"])
    assert [plain[i]["prompts"] for i in range(20)] == [mixed[i]["prompts"] for i in range(20)]


def test_partial_captions_leave_out_colour_or_background_and_keep_image_and_labels():
    full = ShapesDataset(600, seed=2)
    partial = ShapesDataset(600, seed=2, partial_caption_fraction=0.3)
    shortened = 0
    kinds = set()
    for i in range(600):
        a, b = full[i], partial[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert (a["shape"], a["color"], a["background"], a["class_labels"]) == (
            b["shape"], b["color"], b["background"], b["class_labels"]
        )  # fmt: skip
        if a["prompts"] != b["prompts"]:
            shortened += 1
            spec = shapes.spec_for_index(2, i)
            assert spec.shape in b["prompts"] and set(b["prompts"].split()) < set(a["prompts"].split())
            kinds.add((spec.color in b["prompts"].split(), "background" in b["prompts"]))
    assert 0.25 < shortened / 600 < 0.35
    assert kinds == {(False, True), (True, False), (False, False)}
    assert partial[11]["prompts"] == ShapesDataset(600, seed=2, partial_caption_fraction=0.3)[11]["prompts"]


@pytest.mark.parametrize("key", ["styled_fraction", "partial_caption_fraction"])
def test_fractions_outside_0_1_are_rejected(key):
    with pytest.raises(ValueError, match=key):
        ShapesDataset(10, **{key: 1.5})


def test_class_labels_are_shape_times_colour_and_invert_to_names():
    spec = shapes.spec_for_index(0, 3)
    label = shapes.class_label(spec)
    assert 0 <= label < shapes.NUM_CLASSES == 48
    assert shapes.class_name(label) == f"{spec.color} {spec.shape}"
    assert ShapesDataset(5, seed=0)[3]["class_labels"] == label
