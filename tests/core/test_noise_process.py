"""A flow-matching or unknown scheduler is refused before training, never trained with the DDPM objective."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_components, tiny_module
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from lightning_ft.core import DiffusionBase
from lightning_ft.core.noise_process import check_ddpm_scheduler


def test_flow_matching_schedulers_are_refused_naming_the_scheduler():
    components = tiny_components()
    components["scheduler"] = {"class": "FlowMatchEulerDiscreteScheduler", "config": {"shift": 3.0}}
    with pytest.raises(NotImplementedError, match=r"model.components.scheduler: .*FlowMatchEulerDiscreteScheduler"):
        DiffusionBase(components=components)
    # Sana ships a DPM-Solver over flow sigmas with flow prediction: the same objective, refused the same way.
    sana_like = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    with pytest.raises(NotImplementedError, match="flow matching"):
        check_ddpm_scheduler(sana_like)


def test_a_pretrained_folder_with_a_flow_matching_scheduler_is_refused(tmp_path):
    torch.manual_seed(0)
    tiny_module().save_pretrained(tmp_path / "model")
    FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path / "model" / "scheduler")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(NotImplementedError, match=r"model.pretrained: the scheduler FlowMatchEulerDiscreteScheduler"):
        DiffusionBase(pretrained=str(tmp_path / "model"))


def test_ddpm_family_schedulers_pass_and_unknown_ones_are_named():
    check_ddpm_scheduler(DDIMScheduler())
    check_ddpm_scheduler(DPMSolverMultistepScheduler())

    class HomeMadeScheduler:
        config = {}

    with pytest.raises(ValueError, match="unknown scheduler HomeMadeScheduler"):
        check_ddpm_scheduler(HomeMadeScheduler(), "model.components.scheduler")
