"""The trainable set: LoRA trains only LoRA weights (and leaves the base untouched), attention-only, none."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_module, train_steps
from diffusers.models.attention_processor import Attention

from lightning_ft.core.trainable import DEFAULT_LORA_TARGETS


def _train_steps(module, steps=3):
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "prompts": ["a sks star", "a red circle"]}
    train_steps(module, batch, steps)


def _expected_lora_count(denoiser, rank):
    count = 0
    for module in denoiser.modules():
        if isinstance(module, Attention):
            for name in DEFAULT_LORA_TARGETS:
                layer = module.get_submodule(name).base_layer
                count += rank * (layer.in_features + layer.out_features)
    return count


def test_lora_trains_only_lora_parameters_and_base_is_untouched():
    torch.manual_seed(0)
    module = tiny_module(trainable="lora", lora_rank=3, lr=1e-2)
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == _expected_lora_count(module.denoiser, 3)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in trainable.items()}
    _train_steps(module)
    for name, value in frozen_before.items():
        assert torch.equal(value, dict(module.named_parameters())[name]), name
    assert any(not torch.equal(lora_before[n], p) for n, p in trainable.items())


def test_lora_is_identity_at_initialisation():
    torch.manual_seed(0)
    base = tiny_module()
    torch.manual_seed(0)
    lora = tiny_module(trainable="lora")
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    cond = base.encode_prompts(["a red star", "a sks circle"])
    assert torch.allclose(base.predict(x, t, cond), lora.predict(x, t, cond), atol=1e-6)


def test_attention_mode_trains_exactly_the_attention_modules():
    module = tiny_module(trainable="attention")
    attention_names = set()
    for prefix, sub in module.denoiser.named_modules():
        if isinstance(sub, Attention):
            attention_names |= {f"{prefix}.{n}" for n, _ in sub.named_parameters()}
    trainable = {n for n, p in module.denoiser.named_parameters() if p.requires_grad}
    assert trainable == attention_names and trainable
    assert not any(p.requires_grad for p in module.text_encoder.parameters())
    assert not any(p.requires_grad for p in module.vae.parameters())


def test_none_mode_leaves_nothing_to_train_and_optimizer_says_so():
    module = tiny_module(trainable="none")
    with pytest.raises(ValueError, match="nothing to train"):
        module.configure_optimizers()


def test_unknown_mode_and_unmatched_lora_targets_fail_clearly():
    with pytest.raises(ValueError, match="model.trainable='everything'"):
        tiny_module(trainable="everything")
    with pytest.raises(ValueError, match="lora_target_modules"):
        tiny_module(trainable="lora", lora_target_modules=["no_such_layer"])


def test_train_text_encoder_makes_it_trainable():
    module = tiny_module(train_text_encoder=True)
    assert all(p.requires_grad for p in module.text_encoder.parameters())
