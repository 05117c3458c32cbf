"""Speed options (attention kernel, channels-last, gradient checkpointing) keep the math, and really switch on;
modules loaded from a pretrained folder train in train mode."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_module
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from lightning_ft.embedded import asset_path


def _batch(n: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1,
            "prompts": ["a red star on a gray background"] * n}  # fmt: skip


def _loss_and_grads(module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.train()
    torch.manual_seed(3)
    loss, _ = module.training_loss(_batch())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize(
    "option", [{"attention": "eager"}, {"channels_last": True}, {"gradient_checkpointing": True}], ids=str
)
def test_speed_option_keeps_loss_and_gradients(option):
    torch.manual_seed(0)
    plain = tiny_module()
    torch.manual_seed(0)
    fast = tiny_module(**option)
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(fast)
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-3, atol=1e-6), name


def test_attention_option_sets_the_processor_of_every_attention():
    eager = tiny_module(attention="eager").denoiser.attn_processors
    sdpa = tiny_module(attention="sdpa").denoiser.attn_processors
    assert eager and all(type(p) is AttnProcessor for p in eager.values())
    assert all(type(p) is AttnProcessor2_0 for p in sdpa.values())
    with pytest.raises(ValueError, match=r"model.attention='flash3'.*eager.*sdpa"):
        tiny_module(attention="flash3")


def test_channels_last_puts_conv_weights_in_channels_last_layout():
    conv = tiny_module(channels_last=True).denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_gradient_checkpointing_recomputes_blocks_in_backward():
    """With checkpointing a resnet's forward runs twice per step (forward + recomputation in backward)."""
    counts = {}
    for enabled in (False, True):
        module = tiny_module(gradient_checkpointing=enabled, train_text_encoder=True)
        calls, resnet = [], module.denoiser.down_blocks[0].resnets[0]
        forward = resnet.forward  # counted by wrapping: torch's recomputation does not run forward hooks
        resnet.forward = lambda *a, calls=calls, forward=forward, **k: calls.append(1) or forward(*a, **k)
        _loss_and_grads(module)
        counts[enabled] = len(calls)
        assert module.text_encoder.is_gradient_checkpointing is enabled
    assert counts == {False: 1, True: 2}


def test_modules_loaded_from_a_pretrained_folder_train_in_train_mode():
    """diffusers' from_pretrained returns eval-mode models; the trainable ones must train in train mode (dropout,
    transformers' gradient checkpointing) and the frozen ones stay in eval."""
    from lightning_ft.methods import DreamBooth

    module = DreamBooth(pretrained=str(asset_path("shapes-t2i")), train_text_encoder=True)
    assert module.training and module.denoiser.training and module.text_encoder.training
    assert not module.vae.training
    frozen_text = DreamBooth(pretrained=str(asset_path("shapes-t2i")))
    assert frozen_text.denoiser.training and not frozen_text.text_encoder.training
