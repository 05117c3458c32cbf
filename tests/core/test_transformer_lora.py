"""LoRA on denoisers without diffusers' ``add_adapter`` (DiT), through PEFT injection: identity at init, only LoRA
trains, merged copy of the base architecture, PEFT-format save and load; the UNet path is unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_components
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer

from lightning_ft.core.trainable import (
    DEFAULT_LORA_TARGETS,
    apply_trainable,
    default_lora_targets,
    has_lora,
    load_peft_lora,
    lora_state_dict,
    merged_copy,
    save_peft_lora,
)


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    """The denoiser of configs/model/tiny_dit.yaml (random weights), in eval mode."""
    config = tiny_components("tiny_dit")["denoiser"]
    assert config["class"] == "DiTTransformer2DModel"
    torch.manual_seed(seed)
    return DiTTransformer2DModel(**config["config"]).eval()


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """The denoiser of configs/model/tiny_t2i.yaml (random weights), in eval mode."""
    config = tiny_components("tiny_t2i")["denoiser"]
    assert config["class"] == "UNet2DConditionModel"
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config["config"]).eval()


def test_tiny_dit_is_the_config_model():
    model = tiny_dit()
    assert not hasattr(model, "add_adapter")  # the path this file is about
    assert model.config.num_embeds_ada_norm == 48 and model.config.out_channels == 8


def dit_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.tensor([3, 47])


def dit_out(model, inputs):
    x, t, y = inputs
    with torch.no_grad():
        return model(x, t, class_labels=y).sample


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 16, generator=g)


def unet_out(model, inputs):
    x, t, cond = inputs
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=cond).sample


def perturb_lora(model, seed: int = 2) -> None:
    """Give every LoRA up matrix (zero at init) random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def tuner_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def test_dit_lora_is_identity_at_init_and_trains_only_lora():
    model = tiny_dit()
    inputs = dit_inputs()
    reference = dit_out(model, inputs)
    apply_trainable(model, "lora", lora_rank=3)
    # Every attention projection of the block got an adapter, nothing else.
    assert sorted(tuner_layers(model)) == sorted(f"transformer_blocks.0.attn1.{t}" for t in DEFAULT_LORA_TARGETS)
    assert torch.equal(dit_out(model, inputs), reference)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # rank 3 on four 16x16 projections: A (3x16) + B (16x3) each.
    assert sum(p.numel() for p in trainable.values()) == 4 * (3 * 16 + 16 * 3)
    # The config is where the rest of the code reads it; alpha defaults to the rank, init as diffusers' recipe.
    config = next(iter(model.peft_config.values()))
    assert config.r == 3 and config.lora_alpha == 3 and config.init_lora_weights == "gaussian"
    assert set(config.target_modules) == set(DEFAULT_LORA_TARGETS)
    # A gradient step moves the LoRA weights only.
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    x, t, y = inputs
    model.train()
    model(x, t, class_labels=y).sample.pow(2).mean().backward()
    optimizer.step()
    assert all(torch.equal(v, dict(model.named_parameters())[n]) for n, v in frozen.items())
    assert any(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


def test_dit_lora_unmatched_targets_name_the_setting():
    with pytest.raises(ValueError, match="model.lora_target_modules"):
        apply_trainable(tiny_dit(), "lora", lora_target_modules=["no_such_layer"])


def test_has_lora_for_injected_and_diffusers_adapters():
    dit, unet = tiny_dit(), tiny_unet()
    assert not has_lora(dit) and not has_lora(unet)
    apply_trainable(dit, "lora")
    apply_trainable(unet, "lora")
    assert has_lora(dit) and has_lora(unet)
    assert not has_lora(merged_copy(dit)) and not has_lora(merged_copy(unet))


def test_dit_merged_copy_is_a_plain_dit_with_the_lora_output():
    model = tiny_dit()
    plain_names = set(dict(model.named_parameters()))
    inputs = dit_inputs()
    base = dit_out(model, inputs)
    apply_trainable(model, "lora", lora_rank=2, lora_alpha=4)  # scale alpha / rank = 2
    perturb_lora(model)
    lora_output = dit_out(model, inputs)
    assert not torch.allclose(lora_output, base, atol=1e-3)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}

    merged = merged_copy(model)
    assert type(merged) is DiTTransformer2DModel
    assert tuner_layers(merged) == [] and "peft_config" not in vars(merged)
    assert set(dict(merged.named_parameters())) == plain_names  # the base architecture's names exactly
    torch.testing.assert_close(dit_out(merged, inputs), lora_output, atol=1e-5, rtol=0)
    # The original keeps its adapter, its weights and its output.
    assert has_lora(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], v) for n, v in before.items())
    assert torch.equal(dit_out(model, inputs), lora_output)
    # The merged weights are not the base's: the LoRA went into them.
    q = "transformer_blocks.0.attn1.to_q.weight"
    assert not torch.allclose(merged.state_dict()[q], before["transformer_blocks.0.attn1.to_q.base_layer.weight"])
    # And a plain DiT loads them (what a full export holds).
    fresh = tiny_dit(seed=5)
    fresh.load_state_dict(merged.state_dict())
    torch.testing.assert_close(dit_out(fresh, inputs), lora_output, atol=1e-5, rtol=0)


def test_dit_peft_lora_round_trip_onto_a_fresh_model(tmp_path):
    model = tiny_dit()
    apply_trainable(model, "lora", lora_rank=2, lora_alpha=6)
    perturb_lora(model)
    inputs = dit_inputs()
    expected = dit_out(model, inputs)

    folder = save_peft_lora(model, tmp_path / "lora")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 2 and written["lora_alpha"] == 6
    assert set(written["target_modules"]) == set(DEFAULT_LORA_TARGETS)

    fresh = tiny_dit()  # same base weights, no adapter
    assert not torch.allclose(dit_out(fresh, inputs), expected, atol=1e-3)
    load_peft_lora(fresh, folder)
    assert has_lora(fresh)
    torch.testing.assert_close(dit_out(fresh, inputs), expected, atol=1e-6, rtol=0)
    loaded, saved = lora_state_dict(fresh), lora_state_dict(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    # A model with more blocks refuses the file instead of loading part of it; other widths fail in torch.
    deeper = DiTTransformer2DModel(**{**tiny_dit().config, "num_layers": 2})
    with pytest.raises(ValueError, match="does not fit"):
        load_peft_lora(deeper, folder)
    narrower = DiTTransformer2DModel(**{**tiny_dit().config, "attention_head_dim": 4})
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_peft_lora(narrower, folder)


def test_unet_lora_path_still_works(tmp_path):
    model = tiny_unet()
    plain_names = set(dict(model.named_parameters()))
    inputs = unet_inputs()
    base = unet_out(model, inputs)
    apply_trainable(model, "lora", lora_rank=2)
    assert getattr(model, "_hf_peft_config_loaded", False)  # diffusers' own adapter API was used
    assert torch.equal(unet_out(model, inputs), base)
    perturb_lora(model)
    lora_output = unet_out(model, inputs)
    assert not torch.allclose(lora_output, base, atol=1e-4)

    merged = merged_copy(model)
    assert type(merged) is UNet2DConditionModel and tuner_layers(merged) == []
    assert set(dict(merged.named_parameters())) == plain_names
    torch.testing.assert_close(unet_out(merged, inputs), lora_output, atol=1e-5, rtol=0)
    assert has_lora(model) and torch.equal(unet_out(model, inputs), lora_output)

    load_peft_lora(fresh := tiny_unet(), save_peft_lora(model, tmp_path / "unet_lora"))
    assert getattr(fresh, "_hf_peft_config_loaded", False)
    torch.testing.assert_close(unet_out(fresh, inputs), lora_output, atol=1e-6, rtol=0)


def test_merged_copy_without_lora_is_an_independent_copy():
    model = tiny_dit()
    copy = merged_copy(model)
    assert copy is not model and type(copy) is DiTTransformer2DModel
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.equal(next(copy.parameters()), next(model.parameters()))


def test_default_lora_targets_match_unet_dit_and_pixart():
    pixart = PixArtTransformer2DModel(
        sample_size=16, patch_size=4, in_channels=4, out_channels=8, num_layers=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, caption_channels=16, norm_num_groups=4,
    )  # fmt: skip
    for model in (tiny_unet(), tiny_dit(), pixart):
        targets = default_lora_targets(model)
        assert targets == DEFAULT_LORA_TARGETS
        apply_trainable(model, "lora", lora_target_modules=targets)
        layers = tuner_layers(model)
        # Every target names a layer in each attention module, and only attention projections are adapted.
        assert layers and all(any(n.endswith(f".{t}") for t in targets) for n in layers)
        assert all(".attn1." in n or ".attn2." in n for n in layers)
    # PixArt's text cross-attention is adapted too (as in a UNet); DiT has none.
    assert any(".attn2." in n for n in tuner_layers(pixart))
    with pytest.raises(ValueError, match="model.lora_target_modules"):
        default_lora_targets(torch.nn.Sequential(torch.nn.Linear(4, 4)))
