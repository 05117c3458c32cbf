"""Noise processes: the DDPM process for beta schedules, the flow-matching process as diffusers' SD3 / Flux training
scripts define it (sigma tables, densities, shifts, weights), and unknown schedulers refused by name."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_components, tiny_module
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lightning_ft.core import DiffusionBase
from lightning_ft.core.noise_process import (
    DDPMProcess,
    FlowMatchingProcess,
    check_ddpm_scheduler,
    noise_process_for,
)


def flow(shift=3.0, **kwargs):
    return FlowMatchingProcess(FlowMatchEulerDiscreteScheduler(shift=shift), **kwargs)


def test_the_flow_interpolation_target_and_x0_are_rectified_flow():
    process = flow()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    sigma = process.sigmas(t).view(-1, 1, 1, 1)
    noisy = process.add_noise(x0, noise, t)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(process.target(x0, noise, t), noise - x0)
    torch.testing.assert_close(process.predicted_x0(noise - x0, noisy, t), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(process.model_timesteps(t), process.sigmas(t) * 1000)
    assert process.sigmas(torch.tensor([999])).item() == pytest.approx(1.0)  # t = T - 1 is pure noise


def test_sigmas_are_the_schedulers_table_read_from_the_other_end():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    process = FlowMatchingProcess(scheduler)
    index = torch.arange(1000)
    torch.testing.assert_close(process.sigmas(999 - index), scheduler.sigmas[:1000], atol=1e-6, rtol=0)
    # Shifted: the middle of the schedule is noisier than the middle of the data-to-noise line.
    assert process.sigmas(torch.tensor([499])).item() == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize("density", ["logit_normal", "mode", "uniform"])
def test_densities_draw_the_sigmas_diffusers_scripts_draw(density):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    process = FlowMatchingProcess(scheduler, density=density)
    ours = process.sigmas(process.sample_timesteps(4096, generator=torch.Generator().manual_seed(0)))
    # diffusers' SD3 script: u = compute_density_for_timestep_sampling(...); sigmas[(u * T).long()]
    scheme = "none" if density == "uniform" else density
    u = compute_density_for_timestep_sampling(scheme, 4096, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, scheduler.sigmas[(u * 1000).long()], atol=1e-6, rtol=0)


def test_logit_normal_concentrates_on_the_middle():
    process = flow(shift=1.0, density="logit_normal")
    sigma = process.sigmas(process.sample_timesteps(20000, generator=torch.Generator().manual_seed(1)))
    uniform = flow(shift=1.0).sigmas(
        flow(shift=1.0).sample_timesteps(20000, generator=torch.Generator().manual_seed(1))
    )
    middle = lambda s: ((s > 0.3) & (s < 0.7)).float().mean().item()  # noqa: E731
    assert middle(sigma) > middle(uniform) + 0.1


def test_resolution_dependent_shift_is_the_pipelines():
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    process = FlowMatchingProcess(scheduler)
    t = torch.tensor([100, 500, 900])
    for side in (32, 128):  # latent sides: 256 and 4096 image tokens of 2x2 patches
        x = torch.zeros(3, 16, side, side)
        mu = 0.5 + (1.15 - 0.5) * ((side * side / 4) - 256) / (4096 - 256)  # Flux's calculate_shift
        u = (t.float() + 1) / 1000
        expected = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        torch.testing.assert_close(process.sigmas(t, x.shape), expected.float(), atol=1e-6, rtol=0)
        noisy = process.add_noise(x, torch.ones_like(x), t)
        torch.testing.assert_close(noisy[:, 0, 0, 0], expected.float(), atol=1e-6, rtol=0)
    # A larger image is shifted towards noise: the same t is noisier.
    assert (process.sigmas(t, (1, 16, 128, 128)) > process.sigmas(t, (1, 16, 32, 32))).all()
    assert FlowMatchingProcess(scheduler, shift=1.0).sigmas(t).tolist() == pytest.approx(((t + 1) / 1000).tolist())


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weightings_are_diffusers(weighting):
    process = flow(loss_weighting=weighting)
    t = torch.tensor([3, 400, 998])
    torch.testing.assert_close(process.loss_weights(t), compute_loss_weighting_for_sd3(weighting, process.sigmas(t)))


def test_a_flow_model_trains_the_flow_objective_and_samples_with_its_own_scheduler():
    module = tiny_module(DiffusionBase, "tiny_sd3", loss_weighting="cosmap", timestep_density="mode")
    assert module.noise_process.kind == "flow_matching" and module.noise_process.density == "mode"
    x0, noise, t = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    torch.testing.assert_close(module.prediction_target(x0, noise, t), noise - x0)
    torch.testing.assert_close(module.timestep_weights(t), module.noise_process.loss_weights(t))
    assert type(module.sampling_scheduler()).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert module.sampling_scheduler().config.shift == 3.0
    images = module.generate(prompts=["a red star", "a blue circle"], seeds=[0, 1])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_a_family_whose_pipeline_samples_another_process_is_refused():
    components = tiny_components()
    components["scheduler"] = {"class": "FlowMatchEulerDiscreteScheduler", "config": {"shift": 3.0}}
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler describes flow_matching.*stable_diffusion"):
        DiffusionBase(components=components)
    components = tiny_components("tiny_sd3")
    components["scheduler"] = {"class": "DDPMScheduler", "config": {}}
    with pytest.raises(ValueError, match="DDPMScheduler describes ddpm.*sd3"):
        DiffusionBase(components=components)


def test_settings_of_the_other_process_are_refused_by_name():
    components = tiny_components("tiny_sd3")
    with pytest.raises(ValueError, match="model.snr_gamma"):
        DiffusionBase(components=components, snr_gamma=5.0).timestep_weights(torch.tensor([1]))
    with pytest.raises(ValueError, match="model.prediction_type='v_prediction'"):
        DiffusionBase(components=components, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="model.loss_weighting"):
        tiny_module(loss_weighting="cosmap")
    with pytest.raises(ValueError, match="model.timestep_density='logit_normal'"):
        tiny_module(timestep_density="logit_normal")
    with pytest.raises(ValueError, match="model.timestep_density='beta'"):
        DiffusionBase(components=components, timestep_density="beta")


def test_sana_like_solver_trains_with_the_euler_flow_of_its_shift_and_samples_with_itself():
    sana = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    process = noise_process_for(sana)
    assert isinstance(process, FlowMatchingProcess) and process.scheduler.config.shift == 3.0
    assert process.model_scheduler.config.use_flow_sigmas


def test_ddpm_schedulers_pass_and_unknown_ones_are_named():
    assert isinstance(noise_process_for(DDIMScheduler()), DDPMProcess)
    check_ddpm_scheduler(DPMSolverMultistepScheduler())
    with pytest.raises(NotImplementedError, match="flow matching"):
        check_ddpm_scheduler(FlowMatchEulerDiscreteScheduler())

    class HomeMadeScheduler:
        config = {}

    with pytest.raises(ValueError, match="model.components.scheduler: unknown scheduler HomeMadeScheduler"):
        noise_process_for(HomeMadeScheduler(), "model.components.scheduler")
