"""A3FTA: zero-init identity, what trains, the two learning rates, export with adapters and reload."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_components, tiny_module, train_steps

from lightning_ft.core import DiffusionBase
from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.core.trainable import attention_parameter_names
from lightning_ft.methods import AdapterAttentionFineTuning
from lightning_ft.nn.adapters import AdaptedProjection, TimeAwareAdapter, load_adapters, without_adapters


def _batch(n: int = 2):
    return {"pixel_values": torch.rand(n, 3, 32, 32) * 2 - 1, "prompts": ["a red star on a gray background"] * n}


def _inputs(module, n: int = 3):
    x = torch.randn(n, 4, 16, 16)
    t = torch.tensor([10, 500, 990][:n])
    inputs = module.family.sample_inputs(["a red star"] * n, list(range(n)), n)
    condition = module.encode_inputs(module.family.raw_inputs(inputs))
    return x, t, condition


def _perturb_adapters(module, scale=0.1):
    with torch.no_grad():
        for p in module.adapter_parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("model", ["tiny_t2i", "tiny_dit"])
def test_adapters_are_the_identity_at_initialisation(model):
    torch.manual_seed(0)
    module = AdapterAttentionFineTuning(components=tiny_components(model), sample_steps=2)
    adapted = [m for m in module.denoiser.modules() if isinstance(m, AdaptedProjection)]
    assert adapted and all(isinstance(m.adapter, TimeAwareAdapter) for m in adapted)
    plain = without_adapters(copy.deepcopy(module.denoiser))
    x, t, condition = _inputs(module)
    module.eval()
    assert torch.equal(module.predict(x, t, condition), module.predict(x, t, condition, denoiser=plain))
    _perturb_adapters(module)
    assert not torch.allclose(module.predict(x, t, condition), module.predict(x, t, condition, denoiser=plain))


def test_self_and_cross_attention_get_adapters_and_the_time_embedding_reaches_them():
    torch.manual_seed(0)
    module = tiny_module(AdapterAttentionFineTuning)
    adapted = {n: m for n, m in module.denoiser.named_modules() if isinstance(m, AdaptedProjection)}
    assert {n.rsplit(".", 3)[-3] for n in adapted} == {"attn1", "attn2"}
    seen = []
    module.denoiser.time_embedding.register_forward_hook(lambda mod, inputs, out: seen.append(out))
    module.eval()
    x, _, condition = _inputs(module, 2)
    module.predict(x, torch.tensor([10, 900]), condition)
    tap = next(iter(adapted.values())).tap
    assert torch.equal(tap.value, torch.nn.functional.silu(seen[-1]))  # SiLU(e_t) of this very forward
    _perturb_adapters(module)
    adapter = next(iter(adapted.values())).adapter
    a = torch.randn(2, 5, adapter.norm.normalized_shape[0])
    early, late = adapter(a, tap.value[:1].expand(2, -1)), adapter(a, tap.value[1:].expand(2, -1))
    assert not torch.allclose(early, late)  # the adapter's output depends on the timestep


def test_only_attention_and_adapters_receive_gradients_and_change():
    torch.manual_seed(0)
    module = tiny_module(AdapterAttentionFineTuning, lr=1e-3, adapter_lr=1e-3)
    before = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    attention = attention_parameter_names(module.denoiser)
    allowed = {n for n, p in module.denoiser.named_parameters() if n in attention}
    train_steps(module, _batch(), steps=2)
    changed = {k for k, v in module.denoiser.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= allowed  # adapters live inside Attention.to_out[0]
    assert any(".adapter.up." in k for k in changed) and any("to_q" in k for k in changed)
    assert not any("resnets" in k or "time_embedding" in k or "conv_in" in k for k in changed)
    assert not any(p.requires_grad for p in module.text_encoder.parameters()) and not any(
        p.requires_grad for p in module.vae.parameters()
    )


def test_adapters_and_attention_have_their_own_learning_rates():
    module = tiny_module(AdapterAttentionFineTuning, lr=2e-5, adapter_lr=1e-4)
    groups = module.param_groups()
    adapter_ids = {id(p) for p in module.adapter_parameters()}
    assert {id(p) for p in groups[1]["params"]} == adapter_ids and groups[1]["lr"] == 1e-4
    assert groups[0]["params"] and not adapter_ids & {id(p) for p in groups[0]["params"]}
    extra = sum(p.numel() for p in module.adapter_parameters())
    base = sum(p.numel() for n, p in module.denoiser.named_parameters() if ".adapter." not in n)
    assert 0 < extra < base


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="model.trainable must be 'attention' or 'none'"):
        tiny_module(AdapterAttentionFineTuning, trainable="full")
    with pytest.raises(ValueError, match="no attention module named"):
        tiny_module(AdapterAttentionFineTuning, adapter_targets=["nope"])


def test_export_reloads_with_its_adapters_to_identical_images(tmp_path):
    from diffusers import DiffusionPipeline

    torch.manual_seed(0)
    module = tiny_module(AdapterAttentionFineTuning, lr=1e-3, adapter_lr=1e-3, guidance_scale=2.0)
    train_steps(module, _batch(), steps=2)
    _perturb_adapters(module)  # adapters far from zero, so that losing them would show
    prompts, seeds = ["a red star on a gray background", "a blue circle"], [0, 1]
    images = module.generate(prompts=prompts, seeds=seeds)
    folder = module.save_pretrained(tmp_path / "export")

    reloaded = AdapterAttentionFineTuning(pretrained=str(folder), sample_steps=2, guidance_scale=2.0)
    torch.testing.assert_close(reloaded.generate(prompts=prompts, seeds=seeds), images, rtol=0, atol=1e-6)
    # A plain diffusers pipeline of the folder plus load_adapters gives the same images too ...
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    without = reloaded.family.sample(reloaded, pipe, SampleInputs.of(prompts=prompts), seeds, 2, 2.0)
    load_adapters(pipe.unet, folder)
    torch.testing.assert_close(
        reloaded.family.sample(reloaded, pipe, SampleInputs.of(prompts=prompts), seeds, 2, 2.0),
        images,
        rtol=0,
        atol=1e-6,
    )
    assert not torch.allclose(without, images)  # ... and without them it is another model
    # ... which DiffusionBase refuses to load as if it were complete.
    with pytest.raises(ValueError, match="exported by AdapterAttentionFineTuning"):
        DiffusionBase(pretrained=str(folder))


def test_checkpoint_keeps_attention_and_adapters_and_restores_them():
    torch.manual_seed(0)
    module = tiny_module(AdapterAttentionFineTuning)
    _perturb_adapters(module)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    kept = set(checkpoint["state_dict"])
    assert any(".adapter." in k for k in kept) and any("to_q" in k for k in kept)
    assert not any("resnets" in k for k in kept)
    torch.manual_seed(1)
    fresh = tiny_module(AdapterAttentionFineTuning)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    for (name, a), b in zip(module.denoiser.named_parameters(), fresh.denoiser.parameters()):
        if ".adapter." in name:
            assert torch.equal(a, b)
