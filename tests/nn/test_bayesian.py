"""BayesianLinear: exact at init, sampled in training, sigma kept positive, KL forms, conversion of a U-Net."""

from __future__ import annotations

import fnmatch
import re

import pytest
import torch
from conftest import tiny_components, tiny_module
from torch import nn

from lightning_ft.core.families.base import TRANSFORMER_BNN_EXCLUDE, TRANSFORMER_BNN_INCLUDE
from lightning_ft.nn.bayesian import (
    SIGMA_MIN,
    BayesianLinear,
    bayesian_kl,
    bayesian_layers,
    convert_lora_to_bayesian,
    convert_to_bayesian,
    convert_to_plain,
    plain_copy,
)

# The released DreamBooth-BNN selection, spelled out: self-attention projections and feed-forward linears.
EXPECTED = re.compile(
    r"(down_blocks|mid_block|up_blocks)\..*\.transformer_blocks\.\d+\."
    r"(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
)


def _layer(bias=True, **kwargs):
    torch.manual_seed(0)
    linear = nn.Linear(6, 5, bias=bias)
    return linear, BayesianLinear.from_linear(linear, **kwargs)


def test_eval_equals_the_pretrained_layer_and_training_samples_fresh_weights():
    linear, layer = _layer(sigma_init=0.05)
    x = torch.randn(4, 6)
    layer.eval()
    assert torch.equal(layer(x), linear(x))
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, linear(x))
    # One weight sample per call shared by the batch: identical rows in, identical rows out.
    same = layer(x[:1].expand(3, 6))
    assert torch.equal(same[0], same[1]) and torch.equal(same[1], same[2])


def test_conversion_keeps_the_train_or_eval_mode_of_the_layer():
    linear = nn.Linear(6, 5)
    assert BayesianLinear.from_linear(linear).training
    assert not BayesianLinear.from_linear(linear.eval()).training


def test_to_linear_holds_the_means():
    _, layer = _layer()
    with torch.no_grad():
        layer.weight_mu.add_(1.0)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear
    assert torch.equal(linear.weight, layer.weight_mu) and torch.equal(linear.bias, layer.bias_mu)


def test_gradients_reach_mu_and_sigma():
    _, layer = _layer()
    layer.train()
    layer(torch.randn(8, 6)).pow(2).sum().backward()
    for name in ("weight_mu", "weight_sigma", "bias_mu", "bias_sigma"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_sigma_stays_positive_when_the_optimizer_pushes_it_negative():
    _, layer = _layer()
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    x = torch.randn(8, 6)
    layer.train()
    for _ in range(3):
        # A loss that rewards small sigma, with a step far larger than sigma (0.01 - 1.0 < 0).
        loss = layer(x).pow(2).mean() + layer.weight_sigma.sum() + layer.bias_sigma.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert layer.weight_sigma.min() < 0  # the raw parameter did go negative ...
        out = layer(x)  # ... and is clamped before use
        assert layer.weight_sigma.min() >= SIGMA_MIN and layer.bias_sigma.min() >= SIGMA_MIN
        assert torch.isfinite(out).all() and torch.isfinite(layer.kl()).all()


@pytest.mark.parametrize("form", ["released", "textbook"])
@pytest.mark.parametrize("prior_mean", ["pretrained", "zero"])
def test_kl_is_zero_at_the_prior_and_positive_away_from_it(form, prior_mean):
    _, layer = _layer(sigma_init=0.02, prior_sigma=0.02, prior_mean=prior_mean)
    if prior_mean == "zero":
        with torch.no_grad():
            layer.weight_mu.zero_(), layer.bias_mu.zero_()
    assert layer.kl(form).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        layer.weight_sigma[0, 0] = 0.05  # wider than the prior
    wider = layer.kl(form)
    with torch.no_grad():
        layer.weight_sigma[0, 0] = 0.02
        layer.bias_mu[1] += 0.1  # shifted mean
    shifted = layer.kl(form)
    assert wider > 1e-3 and shifted > 1e-3
    # Closed form of the single shifted element: (0.1)^2 / (2 * 0.02^2), the same for both forms at equal sigmas.
    assert shifted.item() == pytest.approx(0.01 / (2 * 0.02**2), rel=1e-4)
    assert layer.kl(form, "mean").item() == pytest.approx(shifted.item() / (6 * 5 + 5), rel=1e-6)


def test_released_and_textbook_kl_are_the_two_argument_orders():
    _, layer = _layer(sigma_init=0.03, prior_sigma=0.01)
    s, sp = 0.03, 0.01
    kl_prior_q = torch.log(torch.tensor(s / sp)) + sp**2 / (2 * s**2) - 0.5
    kl_q_prior = torch.log(torch.tensor(sp / s)) + s**2 / (2 * sp**2) - 0.5
    assert layer.kl("released", "mean").item() == pytest.approx(kl_prior_q.item(), rel=1e-5)
    assert layer.kl("textbook", "mean").item() == pytest.approx(kl_q_prior.item(), rel=1e-5)
    with pytest.raises(ValueError, match="form"):
        layer.kl("reverse")


def test_default_conversion_of_a_unet_is_the_released_selection():
    denoiser = tiny_module().denoiser
    linears = {n for n, m in denoiser.named_modules() if isinstance(m, nn.Linear)}
    expected = {n for n in linears if EXPECTED.fullmatch(n)}
    assert len(expected) == 24  # 4 transformer blocks x (q, k, v, out, ff in, ff out)
    before = {n: p.detach().clone() for n, p in denoiser.named_parameters()}
    names = convert_to_bayesian(denoiser)
    assert set(names) == expected
    assert not any(".attn2." in n or "time_emb_proj" in n for n in names)
    assert set(bayesian_layers(denoiser)) == expected
    assert {n for n, m in denoiser.named_modules() if isinstance(m, nn.Linear)} == linears - expected
    layer = denoiser.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert torch.equal(
        layer.weight_prior_mu, before["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    )

    # Back to plain: exactly the original parameter names and values.
    copy = plain_copy(denoiser)
    assert bayesian_layers(denoiser) and not bayesian_layers(copy)
    convert_to_plain(denoiser)
    for module in (copy, denoiser):
        after = dict(module.named_parameters())
        assert after.keys() == before.keys()
        assert all(torch.equal(after[n], v) for n, v in before.items())


def test_conversion_patterns_and_no_match_error():
    denoiser = tiny_module().denoiser
    names = convert_to_bayesian(denoiser, include=[r"re:mid_block\..*attn1\.to_[qk]"])
    assert names == [
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
    ]
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        convert_to_bayesian(denoiser, include=["*.no_such_layer"])


def test_bayesian_lora_up_matrix_keeps_peft_forward_and_zero_prior():
    torch.manual_seed(0)
    module = tiny_module(trainable="lora", lora_rank=2)
    denoiser = module.denoiser
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    cond = module.encode_prompts(["a sks star"]).fields["encoder_hidden_states"]
    reference = denoiser(x, t, encoder_hidden_states=cond).sample
    names = convert_lora_to_bayesian(denoiser, sigma_init=0.5, prior_sigma=0.01)
    assert names and all(n.endswith(".lora_B.default") for n in names)
    ups = bayesian_layers(denoiser)
    assert set(ups) == set(names) and all(u.prior_mean == "zero" and u.bias_mu is None for u in ups.values())
    assert bayesian_kl(denoiser, "released") > 0  # sigma 0.5 vs prior 0.01
    denoiser.eval()  # mu = 0: exactly the model without LoRA
    assert torch.equal(denoiser(x, t, encoder_hidden_states=cond).sample, reference)
    denoiser.train()  # sampled up matrices go through PEFT's forward
    assert not torch.allclose(denoiser(x, t, encoder_hidden_states=cond).sample, reference)


# ------------------------------------------------------------------------------------------ default selection
# The constants convert_to_bayesian used for every denoiser before the per-kind selection, spelled out here.
OLD_INCLUDE = ("down_blocks.*", "mid_block.*", "up_blocks.*")
OLD_EXCLUDE = ("*.attn2.*", "*.time_emb_proj")


def _tiny_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(**tiny_components("tiny_dit")["denoiser"]["config"]).eval()


def test_default_selection_of_a_unet_is_unchanged():
    denoiser = tiny_module().denoiser
    assert tiny_module().family.bnn_include is None  # SD's family keeps the released rule, the default
    old = [
        n
        for n, m in denoiser.named_modules()
        if isinstance(m, nn.Linear)
        and any(fnmatch.fnmatchcase(n, p) for p in OLD_INCLUDE)
        and not any(fnmatch.fnmatchcase(n, p) for p in OLD_EXCLUDE)
    ]
    assert len(old) == 24
    assert convert_to_bayesian(denoiser) == old  # same names, same order


def test_transformer_selection_of_a_dit_leaves_out_adaln_and_time():
    denoiser = _tiny_dit()
    linears = [n for n, m in denoiser.named_modules() if isinstance(m, nn.Linear)]
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.tensor([3, 47])
    with torch.no_grad():
        before = denoiser(x, t, class_labels=y).sample
    # The UNet rule matches nothing in a DiT: that is what the family's selection is for.
    with pytest.raises(ValueError, match="model.bayesian_include"):
        convert_to_bayesian(denoiser, OLD_INCLUDE, OLD_EXCLUDE)
    assert tiny_module(model="tiny_dit").family.bnn_exclude == TRANSFORMER_BNN_EXCLUDE
    names = convert_to_bayesian(denoiser, TRANSFORMER_BNN_INCLUDE, TRANSFORMER_BNN_EXCLUDE)
    block = "transformer_blocks.0."
    assert names == [block + n for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")] + [
        block + n for n in ("ff.net.0.proj", "ff.net.2")
    ]
    assert not any(".norm" in n or "emb" in n or "time" in n for n in names)
    # What stays deterministic: the adaLN modulation, the per-block timestep embedder and the output head.
    assert set(linears) - set(names) == {
        block + "norm1.linear",
        block + "norm1.emb.timestep_embedder.linear_1",
        block + "norm1.emb.timestep_embedder.linear_2",
        "proj_out_1",
        "proj_out_2",
    }
    with torch.no_grad():
        assert torch.equal(denoiser(x, t, class_labels=y).sample, before)  # eval: the means, i.e. the model


def test_transformer_selection_of_pixart_and_flux_leaves_out_the_text_paths():
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    pixart = PixArtTransformer2DModel(
        sample_size=16, patch_size=4, in_channels=4, out_channels=8, num_layers=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, caption_channels=16, norm_num_groups=4,
    )  # fmt: skip
    names = convert_to_bayesian(pixart, TRANSFORMER_BNN_INCLUDE, TRANSFORMER_BNN_EXCLUDE)
    assert sorted(names) == sorted(
        f"transformer_blocks.0.{n}" for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                              "ff.net.0.proj", "ff.net.2")
    )  # fmt: skip
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[2, 2, 4],
    )  # fmt: skip
    names = set(convert_to_bayesian(flux, TRANSFORMER_BNN_INCLUDE, TRANSFORMER_BNN_EXCLUDE))
    assert names == {
        *(f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")),
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff.net.2",
        *(f"single_transformer_blocks.0.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")),
    }


def test_no_match_names_the_setting():
    with pytest.raises(ValueError, match="model.bayesian_include"):
        convert_to_bayesian(nn.Sequential(nn.Linear(3, 3)))
