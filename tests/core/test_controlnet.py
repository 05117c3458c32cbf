"""ControlNet training (``trainable: controlnet``): the loss is diffusers' ``train_controlnet.py`` /
``train_controlnet_sdxl.py`` on the same batch, only the ControlNet trains, the export is a ControlNet pipeline that
plain diffusers samples identically, Diff-Tuning trains it with its two losses, and everything that cannot take a
ControlNet is refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb, tiny_module
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

from lightning_ft.methods import (
    AdapterAttentionFineTuning,
    BayesianFineTuning,
    ConditionTuning,
    DiffTuning,
    DreamBooth,
    SelfDistillationFineTuning,
)

PROMPTS = ["a red star on a gray background", "a blue circle on a black background"]


def _batch(n: int = 2, side: int = 32) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"pixel_values": torch.rand(n, 3, side, side, generator=g) * 2 - 1, "prompts": PROMPTS[:n],
            "control_values": torch.rand(n, 3, side, side, generator=g)}  # fmt: skip


def _controlled(model: str = "tiny_t2i", cls=DreamBooth, **kwargs):
    module = tiny_module(cls, model=model, trainable="controlnet", **kwargs)
    perturb(module)  # the zero convolutions start at zero: move them, so the ControlNet changes the prediction
    return module


@pytest.mark.parametrize("model", ["tiny_t2i", "tiny_sdxl"])
def test_the_loss_is_the_reference_scripts_on_the_same_batch(model):
    """train_controlnet.py: controlnet(noisy, t, text, controlnet_cond=control) -> residuals into the UNet's down and
    mid blocks, MSE to the noise (SDXL's script adds the pooled text and time ids to both calls)."""
    module = _controlled(model).train()
    batch = _batch()
    torch.manual_seed(7)
    loss, _ = module.training_loss(batch)
    torch.manual_seed(7)
    latents = module.encode_images(batch["pixel_values"])
    # The framework draws the timesteps, then the noise (the script draws them the other way round: same values).
    t = torch.randint(0, module.noise_scheduler.config.num_train_timesteps, (2,)).long()
    noise = torch.randn_like(latents)
    noisy = module.noise_scheduler.add_noise(latents, noise, t)
    condition = module.encode_prompts(PROMPTS)
    extra = {}
    if model == "tiny_sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": condition.fields["text_embeds"],
                                       "time_ids": condition.fields["time_ids"]}}  # fmt: skip
    down, mid = module.controlnet(noisy, t, encoder_hidden_states=condition.fields["encoder_hidden_states"],
                                  controlnet_cond=batch["control_values"], return_dict=False, **extra)  # fmt: skip
    prediction = module.denoiser(noisy, t, encoder_hidden_states=condition.fields["encoder_hidden_states"],
                                 down_block_additional_residuals=list(down), mid_block_additional_residual=mid,
                                 **extra).sample  # fmt: skip
    reference = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    # ... and the control image is read: another control is another loss.
    torch.manual_seed(7)
    other, _ = module.training_loss({**batch, "control_values": 1 - batch["control_values"]})
    assert not torch.allclose(other, loss)


def test_only_the_controlnet_trains():
    module = _controlled(lr=1e-3)
    before = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    controlnet = {k: v.clone() for k, v in module.controlnet.state_dict().items()}
    optimizer = module.configure_optimizers()["optimizer"]
    for _ in range(2):
        loss, _ = module.training_loss(_batch())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, module.denoiser.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, module.controlnet.state_dict()[k]) for k, v in controlnet.items())
    assert {id(p) for p in module.trainable_parameters()} == {id(p) for p in module.controlnet.parameters()}


@pytest.mark.parametrize("model,pipeline", [("tiny_t2i", StableDiffusionControlNetPipeline),
                                            ("tiny_sdxl", StableDiffusionXLControlNetPipeline)])  # fmt: skip
def test_the_export_is_a_controlnet_pipeline_that_samples_the_same_images(model, pipeline, tmp_path):
    module = _controlled(model, sample_steps=3, controlnet_conditioning_scale=0.8).eval()
    controls = _batch()["control_values"]
    ours = module.generate(prompts=PROMPTS, seeds=[0, 1], controls=controls)
    module.save_pretrained(tmp_path / "export")
    loaded = pipeline.from_pretrained(tmp_path / "export")
    assert isinstance(loaded.controlnet, ControlNetModel)
    loaded.set_progress_bar_config(disable=True)
    theirs = loaded(PROMPTS, image=controls, num_inference_steps=3, guidance_scale=module.hparams.guidance_scale,
                    generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="pt", height=32,
                    width=32, controlnet_conditioning_scale=0.8).images  # fmt: skip
    torch.testing.assert_close(ours, theirs.float().clamp(0, 1), rtol=0, atol=1e-5)
    # The ControlNet folder alone loads with diffusers, and it is the one that was trained.
    alone = ControlNetModel.from_pretrained(tmp_path / "export" / "controlnet")
    for key, value in module.controlnet.state_dict().items():
        assert torch.equal(value, alone.state_dict()[key]), key
    # A control image changes the samples (the ControlNet is read when sampling).
    assert not torch.allclose(ours, module.generate(prompts=PROMPTS, seeds=[0, 1], controls=1 - controls))


def test_diff_tuning_trains_a_controlnet_with_memory_rows_under_an_empty_or_paired_control(tmp_path):
    for memory_control in ("empty", "paired"):
        module = _controlled(cls=DiffTuning, memory_size=4, memory_ratio=0.5, memory_sample_steps=2,
                             memory_cache_dir=str(tmp_path / "bank"), memory_control=memory_control)  # fmt: skip
        module.prepare_memory_bank()  # sampled by the base model: the ControlNet is not asked
        seen = []
        original = module.family.control_residuals

        def spy(controlnet, noisy, t, cond, original=original, seen=seen):
            seen.append(cond.fields["controlnet_cond"].clone())
            return original(controlnet, noisy, t, cond)

        module.family.control_residuals = spy
        batch = _batch(4)
        loss, logs = module.training_loss(batch)
        loss.backward()
        assert {"loss/reconsolidation", "loss/retention"} <= logs.keys()
        controls = seen[0]
        assert torch.equal(controls[:2], batch["control_values"][:2])  # the target rows' own controls
        if memory_control == "empty":
            assert not controls[2:].any()
        else:
            assert torch.equal(controls[2:], batch["control_values"][:2])
        assert any(p.grad is not None for p in module.controlnet.parameters())


@pytest.mark.parametrize("cls", [BayesianFineTuning, SelfDistillationFineTuning, AdapterAttentionFineTuning,
                                 ConditionTuning])  # fmt: skip
def test_methods_whose_objective_is_the_denoisers_refuse_a_controlnet(cls):
    with pytest.raises(ValueError, match="'controlnet'") as error:
        tiny_module(cls, trainable="controlnet")
    names = {AdapterAttentionFineTuning: "A3FTA", ConditionTuning: "ANL"}  # their messages use the papers' names
    assert names.get(cls, cls.__name__) in str(error.value)  # the method is named


def test_families_without_controlnet_training_and_misplaced_controls_are_named():
    with pytest.raises(ValueError, match=r"the flux family has no ControlNet training.*sdxl, stable_diffusion"):
        tiny_module(model="tiny_flux", trainable="controlnet")
    plain = tiny_module()
    with pytest.raises(ValueError, match="has no ControlNet"):
        plain.generate(prompts=PROMPTS, seeds=[0, 1], controls=torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="model has no ControlNet: set model.trainable='controlnet'"):
        plain.training_loss(_batch())
    controlled = _controlled()
    with pytest.raises(ValueError, match="give controls"):
        controlled.generate(prompts=PROMPTS, seeds=[0, 1])
    with pytest.raises(ValueError, match="need control images"):
        controlled.training_loss({k: v for k, v in _batch().items() if k != "control_values"})
    with pytest.raises(ValueError, match=r"model.controlnet='x' needs model.trainable='controlnet'"):
        tiny_module(controlnet="x")
