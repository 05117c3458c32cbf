"""SampleGridLogger's rows: its own prompts or labels, else the data module's (the data config's sample_prompts /
sample_labels, else its first captions and class prompt), so that an experiment holds no data-specific prompts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import tiny_module

from lightning_ft.callbacks import SampleGridLogger
from lightning_ft.callbacks.sample_grid import MAX_DATA_ROWS, data_rows


def _trainer(prompts=None, labels=None, **hparams):
    """A trainer whose datamodule has ``hparams`` and a dataset of ``prompts`` / ``labels`` (what the grid reads)."""
    hparams = {"sample_prompts": None, "sample_labels": None, "class_prompt": None, **hparams}
    dataset = SimpleNamespace(prompts=prompts, labels=labels)
    return SimpleNamespace(datamodule=SimpleNamespace(hparams=hparams, dataset=dataset))


@pytest.fixture(scope="module")
def t2i():
    return tiny_module()


def test_the_data_configs_sample_prompts_are_the_rows(t2i):
    trainer = _trainer(["a sks star"] * 3, sample_prompts=["a sks star", "a red circle"], class_prompt="a star")
    rows = SampleGridLogger().grid_inputs(t2i, trainer)
    assert rows.prompts == ("a sks star", "a red circle")


def test_without_sample_prompts_the_first_captions_and_the_class_prompt_are_the_rows(t2i):
    captions = [f"a {c} star" for c in ("red", "blue", "red", "gray", "black", "navy")]  # 5 distinct
    rows = SampleGridLogger().grid_inputs(t2i, _trainer(captions, class_prompt="a star"))
    assert rows.prompts == ("a red star", "a blue star", "a gray star", "a black star", "a star")
    assert len(rows) == MAX_DATA_ROWS + 1
    # A class prompt that is already a caption is not drawn twice; without captions there is nothing to show.
    assert data_rows(_trainer(["a star"], class_prompt="a star").datamodule)[0] == ["a star"]
    assert data_rows(_trainer(None, class_prompt="a star").datamodule) == (None, None)


def test_the_grids_own_prompts_win_and_an_empty_list_asks_with_nothing(t2i):
    trainer = _trainer(["a sks star"], sample_prompts=["a sks star"])
    assert SampleGridLogger(prompts=["a red circle"]).grid_inputs(t2i, trainer).prompts == ("a red circle",)
    rows = SampleGridLogger(prompts=[]).grid_inputs(t2i, trainer)  # ANL: samples from its reference images
    assert not rows.conditional and len(rows) == 1


def test_a_class_conditional_model_takes_the_datas_labels():
    dit = tiny_module(model="tiny_dit")
    trainer = _trainer(["a red star"] * 4, labels=[3, 5, 3, 7], sample_prompts=["a red star"], sample_labels=[0, 9])
    assert SampleGridLogger().grid_inputs(dit, trainer).labels == (0, 9)
    trainer = _trainer(["a red star"] * 4, labels=[3, 5, 3, 7])
    assert SampleGridLogger().grid_inputs(dit, trainer).labels == (3, 5, 7)
    assert SampleGridLogger(labels=[1]).grid_inputs(dit, trainer).labels == (1,)


def test_a_module_outside_a_fit_draws_the_grids_own_prompts_or_one_plain_row(t2i):
    assert SampleGridLogger(prompts=["a red star"]).grid_inputs(t2i).prompts == ("a red star",)
    assert not SampleGridLogger().grid_inputs(t2i).conditional
