"""Caption dropout and tag shuffling (kohya's caption_dropout_rate, shuffle_caption, keep_tokens, caption_separator):
the kept tags never move, the rest is a permutation, draws are seeded and in a fixed order, dropout has its rate,
nothing is drawn when inactive, and the settings fail or warn naming the key."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from lightning_ft.data.captions import (
    CaptionAugment,
    caption_rng,
    caption_setting_warnings,
    check_caption_settings,
    join_tags,
    split_tags,
)

CAPTION = "sks dog, on grass, sunlight, red collar, from above, blurry background"
TAGS = split_tags(CAPTION, ",")


def _state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def test_tags_are_stripped_and_empty_tags_dropped():
    assert split_tags(" a dog ,, on grass,  ,sunlight, ", ",") == ["a dog", "on grass", "sunlight"]
    assert join_tags(["a", "b"], ",") == "a, b"
    assert join_tags(["a", "b"], ", ") == "a, b"
    assert join_tags(["a", "b"], "|") == "a| b"
    assert join_tags(["a", "b"], " ") == "a b"


@pytest.mark.parametrize("keep", [0, 1, 2, 6, 9])
def test_kept_tags_never_move_and_the_rest_is_a_permutation(keep):
    augment = CaptionAugment(shuffle_tags=True, keep_tokens=keep)
    seen = set()
    for index in range(200):
        caption, dropped = augment(CAPTION, caption_rng(0, index))
        tags = caption.split(", ")
        assert not dropped
        assert tags[:keep] == TAGS[:keep]
        assert sorted(tags[keep:]) == sorted(TAGS[keep:])
        seen.add(caption)
    assert len(seen) > (1 if keep < len(TAGS) - 1 else 0)  # shuffled when two or more tags are free to move
    if keep >= len(TAGS) - 1:
        assert seen == {", ".join(TAGS)}


def test_a_custom_separator_splits_and_joins():
    augment = CaptionAugment(shuffle_tags=True, keep_tokens=1, separator="|")
    caption, _ = augment("sks cat|sofa ||window light|", caption_rng(0, 3))
    tags = caption.split("| ")
    assert tags[0] == "sks cat" and sorted(tags[1:]) == ["sofa", "window light"]


def test_the_same_seed_gives_the_same_captions_and_other_seeds_differ():
    augment = CaptionAugment(dropout=0.3, shuffle_tags=True, keep_tokens=1)

    def run(seed):
        return [augment(CAPTION, caption_rng(seed, index)) for index in range(100)]

    assert run(0) == run(0)
    assert run(0) != run(1)
    # Per item too: most items of seed 0 and seed 1 differ (5! = 120 orders of the free tags).
    assert sum(a != b for a, b in zip(run(0), run(1))) > 80


def test_the_draws_are_the_documented_ones_in_order():
    # 1. one rng.random() for dropout, 2. one rng.permutation(k) of the k tags after the kept ones.
    augment = CaptionAugment(dropout=0.5, shuffle_tags=True, keep_tokens=2)
    for index in range(20):
        caption, dropped = augment(CAPTION, caption_rng(7, index))
        rng = caption_rng(7, index)
        expect_dropped = rng.random() < 0.5
        order = rng.permutation(len(TAGS) - 2)
        assert dropped == expect_dropped
        assert caption == ", ".join(TAGS[:2] + [TAGS[2:][i] for i in order])  # also when dropped


def test_the_caption_stream_is_apart_from_the_image_augmentation_stream():
    assert caption_rng(0, 5).random() != np.random.default_rng((0, 5)).random()
    assert caption_rng(0, 5).random() == caption_rng(0, 5).random()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_frequency_is_within_the_binomial_band(p):
    n = 2000
    augment = CaptionAugment(dropout=p)
    dropped = sum(augment(CAPTION, caption_rng(0, index))[1] for index in range(n))
    low, high = binom.interval(0.999, n, p)
    assert low <= dropped <= high


def test_dropout_zero_and_one_are_exact():
    never, always = CaptionAugment(dropout=0.0, shuffle_tags=True), CaptionAugment(dropout=1.0)
    assert not any(never(CAPTION, caption_rng(0, i))[1] for i in range(500))
    assert all(always(CAPTION, caption_rng(0, i))[1] for i in range(500))
    assert always(CAPTION, caption_rng(0, 0)) == (CAPTION, True)  # the caption is kept: the model makes the null


@pytest.mark.parametrize(
    "settings, active",
    [({}, False), ({"keep_tokens": 2}, False), ({"separator": "|"}, False), ({"dropout": 0.1}, True),
     ({"shuffle_tags": True}, True)],
)  # fmt: skip
def test_nothing_is_drawn_when_inactive(settings, active):
    augment = CaptionAugment(**settings)
    rng = np.random.default_rng(0)
    before = _state(rng)
    caption, dropped = augment(CAPTION, rng)
    assert augment.active is active
    assert (_state(rng) != before) is active
    if not active:
        assert (caption, dropped) == (CAPTION, False)  # untouched, not even normalised


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dropout": 1.5}, "data.caption_dropout=1.5"),
        ({"dropout": -0.1}, "data.caption_dropout=-0.1"),
        ({"dropout": float("nan")}, "data.caption_dropout=nan"),
        ({"keep_tokens": -1}, "data.keep_tokens=-1"),
        ({"keep_tokens": 1.5}, "data.keep_tokens=1.5"),
        ({"separator": ""}, "data.tag_separator=''"),
        ({"shuffle_tags": "yes"}, "data.shuffle_tags='yes'"),
    ],
)
def test_settings_that_mean_nothing_fail_naming_the_key(settings, message):
    full = {"dropout": 0.0, "shuffle_tags": False, "keep_tokens": 0, "separator": ",", **settings}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_caption_settings(*full.values())
    with pytest.raises(ValueError, match=message):
        CaptionAugment(**full)


def test_keep_tokens_without_shuffling_warns():
    said = caption_setting_warnings(0.0, False, 2, ",", [CAPTION])
    assert len(said) == 1 and said[0].startswith("data.keep_tokens=2 does nothing without data.shuffle_tags=true")
    assert caption_setting_warnings(0.0, True, 2, ",", [CAPTION]) == []


def test_shuffling_captions_without_tags_warns_naming_one():
    said = caption_setting_warnings(0.0, True, 0, ",", ["a photo of sks dog"] * 3)
    assert said == [
        "data.shuffle_tags=true: no caption holds data.tag_separator=',' (e.g. 'a photo of sks dog', from "
        "data.instance_prompt), so there is nothing to shuffle: write the captions as tags (e.g. 'sks dog, on grass, "
        "sunlight'), set data.tag_separator to the one they use, or omit data.shuffle_tags"
    ]
    sources = ["caption file 'img_00.txt'", "caption file 'img_01.txt'"]
    said = caption_setting_warnings(0.0, True, 1, ",", ["sks dog, grass", "sks dog"], sources)
    assert len(said) == 1 and "no caption has two tags after the data.keep_tokens=1 kept in place" in said[0]
    assert "(e.g. 'sks dog, grass', from caption file 'img_00.txt')" in said[0]
    assert caption_setting_warnings(0.0, True, 1, ",", ["sks dog", "sks dog, grass, sun"]) == []


def test_dropping_every_caption_warns():
    said = caption_setting_warnings(1.0, False, 0, ",", [CAPTION])
    assert len(said) == 1 and said[0].startswith("data.caption_dropout=1.0 trains every instance image")
    assert caption_setting_warnings(0.1, False, 0, ",", [CAPTION]) == []
