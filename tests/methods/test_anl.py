"""ANL condition tuning: zero-init identity, what trains, masked sampling, export and reload."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_module, train_steps

from lightning_ft.core import DiffusionBase
from lightning_ft.methods import ConditionTuning
from lightning_ft.nn.anl import ANLModule, ResnetWithANL, without_anl


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _batch(n: int = 4):
    return {"pixel_values": _images(n), "prompts": ["a red star on a gray background"] * n}


def _perturb(module, scale=0.3):
    """Random ANL weights (they start at zero output) and null tokens, so that conditions show in the samples."""
    with torch.no_grad():
        for p in module.anl_parameters() + [module.null_tokens]:
            p.add_(scale * torch.randn_like(p))


def _module(**kwargs):
    torch.manual_seed(0)
    return tiny_module(ConditionTuning, **kwargs)


def test_anl_modules_follow_every_resnet_and_are_the_identity_at_initialisation():
    module = _module()
    wrapped = [m for m in module.denoiser.modules() if isinstance(m, ResnetWithANL)]
    resnets = sum(len(b.resnets) for b in [*module.denoiser.down_blocks, *module.denoiser.up_blocks])
    assert len(wrapped) == resnets + len(module.denoiser.mid_block.resnets)
    plain = without_anl(copy.deepcopy(module.denoiser))
    module.eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    base = module.encode_prompts(["", ""])
    tokens = module.condition_tokens(_images(2))
    assert tokens.shape[0] == 2 and tokens.shape[2] == module.null_tokens.shape[1]
    cond = base.replace(anl_tokens=tokens)
    assert torch.equal(module.predict(x, t, cond), module.predict(x, t, base, denoiser=plain))
    _perturb(module)
    assert not torch.allclose(module.predict(x, t, cond), module.predict(x, t, base, plain))


def test_only_anl_modules_and_the_null_condition_train():
    module = _module(lr=1e-3, image_condition_dropout=0.5)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert "null_tokens" in trainable and all(".anl." in n for n in trainable - {"null_tokens"})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    torch.manual_seed(3)
    train_steps(module, _batch(), steps=2)
    changed = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
    assert any(".anl." in k for k in changed) and "null_tokens" in changed
    assert changed <= trainable  # the denoiser, text encoder, VAE and condition encoder are untouched


def test_condition_dropout_uses_the_null_tokens_in_training_only():
    module = _module(image_condition_dropout=1.0)
    _perturb(module)
    module.train()
    tokens = module.encode_conditions(_batch(3)).fields["anl_tokens"]
    assert torch.equal(tokens, module.null_tokens.detach().expand(3, -1, -1))
    module.eval()
    tokens = module.encode_conditions(_batch(3)).fields["anl_tokens"]
    assert torch.equal(tokens, module.condition_tokens(_batch(3)["pixel_values"]))


def test_mask_rate_zero_is_unmasked_conditional_sampling(monkeypatch):
    module = _module(guidance_scale=2.0)
    _perturb(module)
    images, seeds = _images(3), [0, 1, 2]
    masked_zero = module.generate(condition_images=images, seeds=seeds, mask_rate=0.0)
    half = module.generate(condition_images=images, seeds=seeds, mask_rate=0.5)
    monkeypatch.setattr(module, "mask_tokens", lambda tokens, rate, seeds: tokens)  # the unmasked sampler
    unmasked = module.generate(condition_images=images, seeds=seeds, mask_rate=0.5)
    assert torch.equal(masked_zero, unmasked) and not torch.allclose(half, unmasked)


def test_partial_masking_gives_more_diverse_samples_of_one_condition_image():
    """At mask rate 0 (and 1) every sample of one condition image gets the same condition; at 0.5 each seed masks
    other tokens, so the conditions, and with them the samples, differ more (the masked-sampling mechanism; whether
    a trained model's samples then gain diversity is the paper's claim, measured in benchmarks, not here)."""
    torch.manual_seed(0)
    module = _module(guidance_scale=1.0)
    _perturb(module, scale=2.0)
    image = _images(1).expand(8, -1, -1, -1)
    seeds = list(range(8))

    def diversity(rate: float) -> float:
        samples = module.generate(condition_images=image, seeds=seeds, mask_rate=rate).flatten(1)
        return torch.pdist(samples).mean().item()

    values = {rate: diversity(rate) for rate in (0.0, 0.5, 1.0)}
    assert values[0.5] > values[0.0] and values[0.5] > values[1.0], values


def test_export_reloads_with_its_modules_and_reference_conditions(tmp_path):
    module = _module(guidance_scale=2.0)
    _perturb(module)
    module.reference_conditions = _images(3)
    seeds = [0, 1, 2]
    images = module.generate(seeds=seeds)
    folder = module.save_pretrained(tmp_path / "export")
    reloaded = ConditionTuning(pretrained=str(folder), sample_steps=2, guidance_scale=2.0)
    torch.testing.assert_close(reloaded.generate(seeds=seeds), images, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exported by ConditionTuning"):
        DiffusionBase(pretrained=str(folder))
    with pytest.raises(ValueError, match="model.anl_head_width=32"):
        ConditionTuning(pretrained=str(folder), anl_head_width=32)


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="model.trainable must be 'none'"):
        tiny_module(ConditionTuning, trainable="full")
    with pytest.raises(ValueError, match="model.mask_rate=2"):
        tiny_module(ConditionTuning, mask_rate=2)
    # CLIP without a path is the paper's ViT-L/14 by hub id: offline, an error that names it.
    with pytest.raises(OSError, match="openai/clip-vit-large-patch14"):
        tiny_module(ConditionTuning, condition_encoder="clip")
    assert all(isinstance(m, ANLModule) for m in [tiny_module(ConditionTuning).denoiser.mid_block.resnets[0].anl])


def test_clip_condition_tokens_resize_and_normalise_with_the_checkpoint_statistics(tmp_path):
    import json

    from transformers import CLIPVisionConfig, CLIPVisionModel

    from lightning_ft.nn.anl import make_condition_encoder

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = CLIPVisionModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    encoder = make_condition_encoder("clip", str(tmp_path / "clip"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens = encoder(images)
    assert tokens.shape == (2, 5, 32) and encoder.dim == 32  # 16x16 / 8x8 patches + the class token
    pixels = torch.nn.functional.interpolate((images + 1) / 2, size=(16, 16), mode="bicubic", antialias=True)
    pixels = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(tokens, model(pixel_values=pixels).last_hidden_state, atol=1e-5)
