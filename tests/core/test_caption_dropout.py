"""The data's caption dropout on the model side: rows the batch flags (``drop_condition``) take the family's null
condition (text, class-conditional, flow transformer), OR-ed with ``model.condition_dropout``'s own draw, which is
unchanged; DreamBooth's prior half is never dropped, and Diff-Tuning keeps the flags of its target rows."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_components, tiny_module

from lightning_ft.core import DiffusionBase
from lightning_ft.core.conditions import Condition
from lightning_ft.methods import DreamBooth
from lightning_ft.methods.diff_tuning import DiffTuning

PROMPTS = ["a red star on a gray background", "a sks circle", "a blue square", "a sks star on navy"]
FLAGS = torch.tensor([True, False, False, True])
CLASS_UNET = {
    "denoiser": {
        "class": "UNet2DModel",
        "config": {"sample_size": 16, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
                   "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "num_class_embeds": 3},
    },
    "scheduler": {"class": "DDPMScheduler", "config": {"num_train_timesteps": 1000, "clip_sample": False}},
}  # fmt: skip


def _batch(n: int = 4, labels: bool = False, **extra) -> dict:
    batch = {"pixel_values": torch.zeros(n, 3, 32, 32)}
    if labels:
        batch["class_labels"] = torch.arange(n) * 5
    else:
        batch["prompts"] = PROMPTS[:n]
    return {**batch, **extra}


def _assert_rows(condition: Condition, expected: Condition, rows) -> None:
    assert set(condition.fields) == set(expected.fields)
    for name, value in condition.fields.items():
        assert torch.equal(value[rows], expected.fields[name][rows]), name


def _check_flagged_rows_are_null(module, batch: dict, flags=FLAGS) -> None:
    """With ``flags`` the flagged rows equal ``null_condition``'s and the others the un-dropped condition."""
    plain = module.encode_conditions(batch)
    dropped = module.encode_conditions({**batch, "drop_condition": flags})
    null = module.null_condition(len(flags), tuple(batch["pixel_values"].shape[-2:]))
    flags = torch.as_tensor(flags)
    _assert_rows(dropped, null, flags)
    _assert_rows(dropped, plain, ~flags)
    assert not torch.equal(plain.fields[next(iter(plain.fields))][flags], null.fields[next(iter(null.fields))][flags])


@pytest.mark.parametrize("training", [False, True])
def test_flagged_rows_of_a_text_model_take_the_empty_prompts_condition(training):
    module = tiny_module(DreamBooth, "tiny_t2i").train(training)  # condition_dropout 0: only the data drops
    _check_flagged_rows_are_null(module, _batch())
    _check_flagged_rows_are_null(module, _batch(), [True, False, False, True])  # a list of flags too


def test_flagged_rows_of_a_flow_transformer_take_its_null_condition():
    module = tiny_module(DreamBooth, "tiny_flux").train()
    _check_flagged_rows_are_null(module, _batch())


@pytest.mark.parametrize("null_class", [None, 40])
def test_flagged_rows_of_a_dit_take_the_null_class(null_class):
    module = DiffusionBase(components=tiny_components("tiny_dit"), sample_steps=2, null_class=null_class).train()
    batch = _batch(labels=True)
    _check_flagged_rows_are_null(module, batch)
    labels = module.encode_conditions({**batch, "drop_condition": FLAGS}).fields["class_labels"]
    null = 48 if null_class is None else null_class  # the DiT's own null row, index num_classes, or the one set
    assert labels.tolist() == [null, 5, 10, null]


def test_a_class_model_without_a_null_class_fails_naming_the_settings():
    module = DiffusionBase(components=CLASS_UNET, sample_steps=2)
    batch = _batch(3, labels=True)
    module.encode_conditions(batch)  # no flags: nothing to drop
    with pytest.raises(ValueError, match="data.caption_dropout > 0 .* set model.null_class"):
        module.encode_conditions({**batch, "drop_condition": torch.tensor([True, False, False])})
    module = DiffusionBase(components=CLASS_UNET, sample_steps=2, null_class=2)
    labels = module.encode_conditions({**batch, "drop_condition": torch.tensor([True, False, False])})
    assert labels.fields["class_labels"].tolist() == [2, 5, 10]


def test_flags_of_the_wrong_length_are_refused():
    module = tiny_module(DreamBooth, "tiny_t2i")
    with pytest.raises(ValueError, match=r"batch\['drop_condition'\] holds 3 flags for a batch of 4 samples"):
        module.encode_conditions(_batch(drop_condition=torch.tensor([True, False, True])))


def test_model_dropout_is_or_ed_with_the_flags_and_draws_as_without_them():
    module = tiny_module(DreamBooth, "tiny_t2i", condition_dropout=0.5).train()
    null = module.null_condition(4, (32, 32))
    for seed in range(4):
        torch.manual_seed(seed)
        plain = module.encode_conditions(_batch())
        after_plain = torch.get_rng_state()
        torch.manual_seed(seed)
        drawn = torch.rand(4) < 0.5
        torch.manual_seed(seed)
        flagged = module.encode_conditions(_batch(drop_condition=FLAGS))
        assert torch.equal(torch.get_rng_state(), after_plain)  # the same draws: the run's RNG stream is unchanged
        _assert_rows(flagged, null, drawn | FLAGS)
        _assert_rows(flagged, plain, ~FLAGS)  # the unflagged rows as without flags (dropped by the draw or not)
        torch.manual_seed(seed)
        _assert_rows(module.encode_conditions(_batch(drop_condition=torch.zeros(4, dtype=torch.bool))), plain, ...)


def test_without_flags_the_condition_and_the_rng_are_as_before():
    module = tiny_module(DreamBooth, "tiny_t2i", condition_dropout=0.5).train()
    torch.manual_seed(0)
    drawn = torch.rand(4) < 0.5
    after = torch.get_rng_state()
    torch.manual_seed(0)
    condition = module.encode_conditions(_batch())
    assert torch.equal(torch.get_rng_state(), after)
    expected = module.encode_inputs(["" if d else p for p, d in zip(PROMPTS, drawn.tolist())], 4)
    _assert_rows(condition, expected, ...)


def _spy(module, monkeypatch) -> list:
    """Record every (batch, condition) of ``module.encode_conditions``."""
    calls, original = [], module.encode_conditions

    def spy(batch, *args, **kwargs):
        condition = original(batch, *args, **kwargs)
        calls.append((batch, condition))
        return condition

    monkeypatch.setattr(module, "encode_conditions", spy)
    return calls


def test_dreambooths_prior_half_is_never_dropped(monkeypatch):
    torch.manual_seed(0)
    module = tiny_module(DreamBooth, "tiny_t2i").train()
    calls = _spy(module, monkeypatch)
    batch = _batch(2, drop_condition=torch.tensor([True, True]))
    batch.update(class_pixel_values=torch.zeros(2, 3, 32, 32), class_prompts=["a star", "a circle"],
                 class_drop_condition=torch.tensor([False, False]))  # fmt: skip
    module.training_loss(batch)
    (both, condition), = calls  # fmt: skip
    assert both["drop_condition"].tolist() == [True, True, False, False]
    _assert_rows(condition, module.null_condition(4, (32, 32)), slice(0, 2))
    _assert_rows(condition, module.encode_inputs([*PROMPTS[:2], "a star", "a circle"], 4), slice(2, 4))


def test_diff_tuning_keeps_the_flags_of_its_target_rows(monkeypatch):
    torch.manual_seed(0)
    module = tiny_module(DiffTuning, "tiny_t2i", memory_size=2, memory_ratio=0.5).train()
    monkeypatch.setattr(module, "draw_memory", lambda k, size: torch.zeros(k, 3, *size))
    calls = _spy(module, monkeypatch)
    module.training_loss(_batch(drop_condition=FLAGS))
    (target, condition), = calls  # fmt: skip
    assert target["drop_condition"].tolist() == [True, False] and target["prompts"] == PROMPTS[:2]
    _assert_rows(condition, module.null_condition(2, (32, 32)), [0])
    _assert_rows(condition, module.encode_inputs(PROMPTS[:2]), [1])
