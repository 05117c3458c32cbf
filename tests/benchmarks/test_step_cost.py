"""The performance benchmarks' machinery (not their timings): step counting, summaries, which class loads an
export back, and a tiny configuration measured end to end."""

from __future__ import annotations

import pytest
from conftest import tiny_components

from benchmarks.launch import REPO, config_args, data_config
from benchmarks.perf import summary_ms
from benchmarks.step_cost import load_experiment, loader_for, measure
from lightning_ft.core import DiffusionBase
from lightning_ft.methods import AdapterAttentionFineTuning, ConditionTuning


def test_summary_is_median_and_quartiles_in_ms():
    assert summary_ms([0.001, 0.002, 0.003, 0.004, 0.005]) == {"median_ms": 3.0, "q1_ms": 1.5, "q3_ms": 4.5}


@pytest.mark.parametrize(
    "folder, expected",
    [("a3fta_adapters", AdapterAttentionFineTuning), ("anl_modules", ConditionTuning), (None, DiffusionBase)],
)
def test_exports_are_loaded_back_by_the_class_that_owns_their_modules(tmp_path, folder, expected):
    if folder:
        (tmp_path / folder).mkdir()
    assert loader_for(tmp_path) is expected


def test_an_experiment_is_loaded_and_run_with_the_data_config_its_header_names():
    assert data_config("experiments/dreambooth_bnn.yaml") == "configs/data/embedded_subject.yaml"
    assert data_config("experiments/dit/sdft.yaml") == "configs/data/embedded_domain.yaml"
    assert data_config("experiments/pretrain_shapes.yaml") is None  # its data module is the shapes world itself
    assert config_args("experiments/anl.yaml") == ["--config", str(REPO / "experiments/anl.yaml"),
                                                   "--config", str(REPO / "configs/data/embedded_domain.yaml")]
    model, data = load_experiment("experiments/dreambooth.yaml")
    assert model["class_path"] == "lightning_ft.methods.DreamBooth"
    assert data["class_prompt"] == "a orange star on a gray background"  # the data config's
    assert data["num_class_images"] == 50 and data["batch_size"] == 4  # the experiment's
    assert data["instance_dir"].endswith("/train") and "${" not in data["heldout_dir"]  # resolved


def test_measure_counts_the_timed_steps_and_exports(subject_dir):
    spec = {
        "model": {"class_path": "lightning_ft.methods.DreamBooth",
                  "init_args": {"components": tiny_components(), "sample_steps": 2, "trainable": "lora"}},
        "data": {"instance_dir": str(subject_dir), "instance_prompt": "a sks star", "resolution": 32},
        "steps": 3, "warmup": 2, "inference": True, "inference_images": 2, "inference_rounds": 1,
    }  # fmt: skip
    result = measure(spec)
    assert result["steps"] == 3 and result["q1_ms"] <= result["median_ms"] <= result["q3_ms"]
    assert 0 < result["trainable_params"] < result["base_denoiser_params"]  # LoRA trains a small part
    assert result["export_denoiser_params"] == result["base_denoiser_params"]  # merged LoRA adds nothing
    assert result["peak_mb"] > 0 and result["sample_ms_per_image"] > 0
