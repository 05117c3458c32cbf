"""Loss math: prediction targets, min-SNR weights, noise offset, condition dropout, frozen copy."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_module
from diffusers.training_utils import compute_snr

from lightning_ft.core.base import DiffusionBase


def test_v_prediction_target_is_the_scheduler_velocity():
    module = tiny_module(prediction_type="v_prediction")
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999])
    target = module.prediction_target(x0, noise, t)
    alpha = module.noise_scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - module.noise_scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(target, alpha * noise - sigma * x0, atol=1e-5)
    assert torch.equal(tiny_module().prediction_target(x0, noise, t), noise)


def test_min_snr_weights_clip_high_snr_timesteps():
    module = tiny_module(snr_gamma=5.0)
    t = torch.tensor([0, 100, 900])
    snr = compute_snr(module.noise_scheduler, t)
    weights = module.timestep_weights(t)
    assert torch.allclose(weights, torch.clamp(snr, max=5.0) / snr)
    assert weights[0] < 1 and weights[2] == pytest.approx(1.0)
    assert torch.equal(tiny_module().timestep_weights(t), torch.ones(3))


def test_noise_offset_shifts_per_channel_means():
    torch.manual_seed(0)
    plain = tiny_module().make_noise(torch.zeros(256, 4, 8, 8))
    offset = tiny_module(noise_offset=1.0).make_noise(torch.zeros(256, 4, 8, 8))
    per_channel = lambda n: n.mean(dim=(2, 3)).std()  # noqa: E731
    assert per_channel(offset) > 5 * per_channel(plain)


def test_condition_dropout_uses_the_empty_prompt():
    module = tiny_module(condition_dropout=1.0)
    module.train()
    dropped = module.encode_conditions({"prompts": ["a red star", "a sks circle"]})
    empty = module.null_condition(2)
    assert torch.allclose(dropped.fields["encoder_hidden_states"], empty.fields["encoder_hidden_states"])
    assert torch.allclose(
        empty.fields["encoder_hidden_states"], module.encode_prompts(["", ""]).fields["encoder_hidden_states"]
    )
    module.eval()  # no dropout outside training
    kept = module.encode_conditions({"prompts": ["a red star", "a sks circle"]})
    assert not torch.allclose(kept.fields["encoder_hidden_states"], empty.fields["encoder_hidden_states"])


def test_frozen_copy_is_made_once_only_when_asked_and_stays_frozen():
    class NeedsTeacher(DiffusionBase):
        requires_frozen_denoiser = True

    assert tiny_module().frozen_denoiser is None
    module = tiny_module(NeedsTeacher)
    assert module.frozen_denoiser is not module.denoiser
    assert not any(p.requires_grad for p in module.frozen_denoiser.parameters())
    module.train()
    assert not module.frozen_denoiser.training
    assert all(not k.startswith("frozen_denoiser") for k in module.trainable_state_keys())


def test_bad_component_specs_name_the_key():
    with pytest.raises(ValueError, match="unknown keys"):
        DiffusionBase(components={"unet": {}})
    with pytest.raises(ValueError, match="no denoiser"):
        DiffusionBase(components={"scheduler": {"class": "DDPMScheduler", "config": {}}})
    with pytest.raises(FileNotFoundError, match="model.pretrained='./no/such/model'"):
        DiffusionBase(pretrained="./no/such/model")


def test_encoding_caches_give_the_same_results_and_skip_recomputation():
    torch.manual_seed(0)
    cached = tiny_module(cache_latents=True)
    plain = tiny_module(cache_text_embeddings=False)
    plain.load_state_dict(cached.state_dict())
    prompts = ["a red star", "a sks circle", "a red star"]
    assert torch.allclose(
        cached.encode_prompts(prompts).fields["encoder_hidden_states"],
        plain.encode_prompts(prompts).fields["encoder_hidden_states"],
    )
    assert cached.text_cache.misses == 2 and len(cached.text_cache) == 2
    cached.encode_prompts(prompts)
    assert cached.text_cache.misses == 2 and cached.text_cache.hits == 4
    assert plain.text_cache is None

    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    a = cached.encode_images(images)
    torch.manual_seed(1)
    b = plain.encode_images(images)
    assert torch.allclose(a, b, atol=1e-5)
    cached.encode_images(images)
    assert cached.latent_cache.misses == 2 and cached.latent_cache.hits == 2


def test_text_cache_is_off_when_the_text_encoder_trains():
    assert tiny_module(train_text_encoder=True).text_cache is None
