"""Ideogram 4: conditions equal ``Ideogram4Pipeline.encode_prompt`` (chat template, Qwen3-VL layer states,
left padding), the conditional transformer is called as the pipeline calls it (packed text + image sequence, 1 -
sigma, negated output), the training loss equals diffusers' DreamBooth-LoRA script's on the same batch, noise and
noise levels, the script's logit-normal density is the framework's under ``logit_std`` and ``flow_shift``, the frozen
unconditional transformer stays frozen and goes with the full export, the full and LoRA-only exports sample the
module's images in plain diffusers, the modular pipeline is refused by name, and BNN / FSDP / A3FTA find their
layers."""

from __future__ import annotations

import json
import math

import family_checks as checks
import pytest
import torch
from conftest import REPO, perturb, tiny_components, tiny_module
from diffusers import DiffusionPipeline, Ideogram4Pipeline
from diffusers.models.transformers.transformer_ideogram4 import Ideogram4TransformerBlock
from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _resolution_aware_mu
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lightning_ft.core.components import Components
from lightning_ft.core.families import detect_family, fsdp_block_classes
from lightning_ft.methods import AdapterAttentionFineTuning, BayesianFineTuning, DreamBooth

PROMPTS = ["a sks star on a gray background", "a red circle"]
CLASS_PROMPTS = ["a star on a gray background", "a blue square"]


def ideogram4(**kwargs):
    return tiny_module(DreamBooth, "tiny_ideogram4", **kwargs)


def perturb_all(module, weights: bool = True) -> None:
    """Trainable weights moved (``weights``), and the VAE's batch-norm statistics made non-trivial (random init: mean
    0, var 1), the same ones every call."""
    if weights:
        perturb(module)
    generator = torch.Generator().manual_seed(7)
    bn = module.vae.bn
    with torch.no_grad():
        bn.running_mean.copy_(0.5 * torch.randn(bn.running_mean.shape, generator=generator))
        bn.running_var.copy_(0.5 + 1.5 * torch.rand(bn.running_var.shape, generator=generator))


def test_conditions_are_the_pipelines_encode_prompt():
    torch.manual_seed(0)
    module = ideogram4().eval()
    family = module.family
    assert family.name == "ideogram4" and family.max_sequence_length == 24  # the pipeline's 2048, capped
    pipe = module.build_pipeline()
    assert isinstance(pipe, Ideogram4Pipeline) and pipe.unconditional_transformer is module.unconditional_transformer
    embeds, positions, segments, indicator = pipe.encode_prompt([*PROMPTS, ""], 8, 8, 24, torch.device("cpu"))
    cond = module.encode_prompts([*PROMPTS, ""])
    mask = cond.fields["encoder_attention_mask"]
    assert mask.sum(1).tolist() == (indicator == 3).sum(1).tolist() == [12, 8, 5]  # with the template's 5 tokens
    assert mask[:, -1].all() and not mask[:, 0].any()  # left padding
    # The pipeline packs [text (24), image tokens (64)]: the text part is the family's condition.
    torch.testing.assert_close(cond.fields["encoder_hidden_states"], embeds[:, :24], rtol=0, atol=1e-6)
    assert embeds[:, 24:].abs().sum() == 0 and cond.fields["encoder_hidden_states"][~mask.bool()].abs().sum() == 0
    # The template wraps every prompt (the empty one too), without <bos> / <eos>.
    ids, m = family.tokenize(module.parts, [""])
    tokens = module.tokenizer.convert_ids_to_tokens(ids[0][m[0].bool()])
    assert tokens == ["<|im_start|>", "user", "<|im_end|>", "<|im_start|>", "assistant"]
    # The null condition is the empty prompt through the conditional branch (the pipeline's unconditional branch is
    # the other transformer, with zero features).
    torch.testing.assert_close(module.null_condition(1).fields["encoder_hidden_states"], embeds[2:, :24], rtol=0,
                               atol=1e-6)  # fmt: skip
    # A prompt over max_sequence_length is refused, as the pipeline refuses it.
    with pytest.raises(ValueError, match="max_sequence_length=24"):
        family.tokenize(module.parts, [" ".join(["star"] * 30)])


def test_the_transformer_is_called_as_the_pipeline_calls_it():
    """One pipeline step captured at the conditional transformer: the family's call on the same latents and 1000
    sigma gives the negated image-token output, whatever the text length it pads to."""
    torch.manual_seed(0)
    module = ideogram4().eval()
    perturb_all(module)
    pipe = module.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with checks.last_denoiser_call(module) as seen:
        pipe(list(PROMPTS), guidance_scale=2.0, guidance_schedule=None, num_inference_steps=2, output_type="latent",
             generator=torch.Generator().manual_seed(0), **module.family.pipeline_call_kwargs(module))  # fmt: skip
    assert seen["hidden_states"].shape == (2, 24 + 64, 16)  # 24 text positions, then 8 x 8 tokens of 4 x 2 x 2
    tokens = seen["hidden_states"][:, 24:]
    latents = tokens.transpose(1, 2).reshape(2, 16, 8, 8)  # model space: (B, 4C, h, w)
    sigma = 1 - seen["timestep"]
    assert 0 < sigma[0] < 1
    cond = module.encode_prompts(PROMPTS)
    with torch.no_grad():
        got = module.family.denoise(module.denoiser, latents, 1000 * sigma, cond)
    expected = -seen["out"][:, 24:].transpose(1, 2).reshape(2, 16, 8, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def patchify_latents(z, patch_size):
    """The script's ``patchify_latents``: (B, C, H, W) -> (B, H/2 * W/2, 4C), channels (row, column, C)."""
    batch_size, ae_channels = z.shape[:2]
    grid_h, grid_w = z.shape[2] // patch_size, z.shape[3] // patch_size
    z = z.view(batch_size, ae_channels, grid_h, patch_size, grid_w, patch_size)
    z = z.permute(0, 2, 4, 3, 5, 1).contiguous()
    return z.view(batch_size, grid_h * grid_w, patch_size * patch_size * ae_channels)


def script_loss(pipe, pixels, prompts, noise, sigmas, max_sequence_length, prior=False):
    """diffusers' train_dreambooth_lora_ideogram4.py, one step on given noise (token layout) and sigmas (its density
    draw), with prior preservation (the batch's second half: class images) when ``prior``."""
    vae, transformer = pipe.vae, pipe.transformer
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    patch_pixels = vae_scale_factor * 2
    latents_bn_mean = vae.bn.running_mean.view(1, 1, -1)
    latents_bn_std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, 1, -1)
    grid_h, grid_w = pixels.shape[-2] // patch_pixels, pixels.shape[-1] // patch_pixels
    prompt_embeds, position_ids, segment_ids, indicator = pipe.encode_prompt(
        prompt=list(prompts), grid_h=grid_h, grid_w=grid_w, max_sequence_length=max_sequence_length,
        device=torch.device("cpu"),
    )  # fmt: skip
    model_input = vae.encode(pixels).latent_dist.mode()
    model_input = patchify_latents(model_input, 2)
    model_input = (model_input - latents_bn_mean) / latents_bn_std
    bsz, _, latent_dim = model_input.shape
    sigmas = sigmas.to(dtype=model_input.dtype).view(bsz, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    text_latent_padding = torch.zeros(bsz, max_sequence_length, latent_dim, dtype=noisy_model_input.dtype)
    packed_hidden_states = torch.cat([text_latent_padding, noisy_model_input], dim=1)
    model_timestep = (1.0 - sigmas).reshape(bsz)
    model_pred = transformer(
        hidden_states=packed_hidden_states, timestep=model_timestep, encoder_hidden_states=prompt_embeds,
        position_ids=position_ids, segment_ids=segment_ids, indicator=indicator, return_dict=False,
    )[0]  # fmt: skip
    model_pred = model_pred[:, max_sequence_length:]
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
    target = model_input - noise
    return checks.script_mse(model_pred, target, weighting, prior, chunk_weighting=True)


def batch_and_noise(prior: bool, seed: int = 1):
    """The DreamBooth batch (``dreambooth_batch``), its noise in model space and in the script's token layout, and
    lightning-ft's t at the batch's u (t = 1000 u: 30, 410, 680, 970 or 120, 830)."""
    batch, pixels, prompts, noise, u = checks.dreambooth_batch(PROMPTS, CLASS_PROMPTS, (16, 8, 8), prior, seed)
    return batch, pixels, prompts, noise, noise.flatten(2).transpose(1, 2), (u * 1000).round().long()


SHAPE = (1, 16, 8, 8)  # model-space latents of a 32 px image


@pytest.mark.parametrize("prior", [False, True])
def test_the_training_loss_is_the_scripts(prior):
    """At the same noise levels (the script draws sigma itself; lightning-ft's t gives sigma through its process) the
    loss is the script's, packing, batch-norm normalisation, 1 - sigma and target included."""
    torch.manual_seed(0)
    module = ideogram4()
    perturb_all(module)
    batch, pixels, prompts, noise, tokens, t = batch_and_noise(prior)
    sigmas = module.noise_process.sigmas(t, SHAPE)
    with torch.no_grad():
        expected = script_loss(module.build_pipeline(), pixels, prompts, tokens, sigmas, 24, prior)
    got = checks.fixed_draws_loss(module, batch, t, noise)
    print(f"prior={prior}: script {expected.item():.8f} lightning-ft {got.item():.8f}")
    assert abs(got.item() - expected.item()) <= 1e-6


def test_the_default_density_is_the_scripts_logit_normal_at_the_resolution_shift():
    """The script's sigma is logit-normal with mean 0.5 log(pixels / 512^2) and std 1.5; lightning-ft draws u
    logit-normal (mean 0, the family's std 1.5) on its 1000-step grid and shifts it by exp of that mean, computed from
    the images' size: one distribution."""
    module = ideogram4()
    process = module.noise_process
    assert (process.density, process.logit_std, process.dynamic) == ("logit_normal", 1.5, True)
    mu = _resolution_aware_mu(32, 32, base_mu=0.0)
    assert math.isclose(process.mu(SHAPE), mu) and math.isclose(math.exp(mu), 32 / 512)
    assert math.isclose(process.mu((1, 16, 64, 32)), _resolution_aware_mu(256, 128, base_mu=0.0))
    n = 20000
    script = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=mu, logit_std=1.5,
                                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    ours = process.sigmas(process.sample_timesteps(n, generator=torch.Generator().manual_seed(1)), SHAPE)
    quantiles = torch.linspace(0.01, 0.99, 99)
    gap = (torch.quantile(script.float(), quantiles) - torch.quantile(ours.float(), quantiles)).abs().max()
    assert gap < 0.03, gap  # two samples of 20000: statistical noise (about 0.015 at the upper tail)
    # Same normal draw z: the script's sigma is sigmoid(mu + 1.5 z); lightning-ft's, from -z, is the shifted grid
    # point of sigmoid(1.5 z): equal up to the grid's 1/1000 in u, which the shift 1/16 stretches at most 16 times.
    z = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    u = torch.sigmoid(-1.5 * z)
    t = 999 - (u * 1000).long().clamp(0, 999)
    assert (process.sigmas(t, SHAPE) - torch.sigmoid(mu + 1.5 * z)).abs().max() < 16 / 1000
    # A fixed model.flow_shift (diffusers' generic std 1.0 and no shift here) draws elsewhere.
    other = ideogram4(flow_shift=1.0, logit_std=1.0).noise_process
    assert not other.dynamic
    drawn = other.sigmas(other.sample_timesteps(n, generator=torch.Generator().manual_seed(1)))
    assert (torch.quantile(drawn.float(), 0.5) - torch.quantile(script.float(), 0.5)).abs() > 0.2


def test_a_fixed_flow_shift_trains_elsewhere_with_the_scripts_loss_there():
    """The same draws of t give other sigmas under ``flow_shift: 1.0``: the script's loss at those sigmas is
    lightning-ft's too, and differs from the one at the default (the script's) noise levels."""
    batch, pixels, prompts, noise, tokens, t = batch_and_noise(False, seed=3)
    losses = {}
    for shift in (None, 1.0):
        torch.manual_seed(0)
        module = ideogram4(flow_shift=shift)
        perturb_all(module)
        sigmas = module.noise_process.sigmas(t, SHAPE)
        with torch.no_grad():
            expected = script_loss(module.build_pipeline(), pixels, prompts, tokens, sigmas, 24)
        losses[shift] = checks.fixed_draws_loss(module, batch, t, noise)
        print(f"flow_shift={shift}: the script's loss at these sigmas {expected.item():.8f} lightning-ft "
              f"{losses[shift]:.8f}")  # fmt: skip
        assert abs(losses[shift].item() - expected.item()) <= 1e-6
    assert abs(losses[None] - losses[1.0]) > 1e-3


def test_the_unconditional_transformer_is_frozen_and_exported_unchanged(tmp_path):
    torch.manual_seed(0)
    module = ideogram4(trainable="full")
    uncond = module.unconditional_transformer
    assert not any(p.requires_grad for p in uncond.parameters()) and not uncond.training
    assert all(p.requires_grad for p in module.denoiser.parameters())
    before = {k: v.clone() for k, v in uncond.state_dict().items()}
    module.train()
    assert not uncond.training
    batch, *_ = batch_and_noise(False)
    loss = module.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is None for p in uncond.parameters())
    module.save_pretrained(tmp_path / "export")
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["unconditional_transformer"] == ["diffusers", "Ideogram4Transformer2DModel"]
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    for key, value in pipe.unconditional_transformer.state_dict().items():
        assert torch.equal(value, before[key]), key
    # A checkpoint keeps the trainable weights only: not the frozen twin.
    assert not any(k.startswith("unconditional_transformer.") for k in module.trainable_state_keys())
    # The exported folder loads back with both transformers.
    reloaded = DreamBooth(pretrained=str(tmp_path / "export"), sample_steps=2, sample_resolution=32)
    assert reloaded.family.name == "ideogram4"
    weight = reloaded.unconditional_transformer.final_layer.linear.weight
    assert torch.equal(weight, before["final_layer.linear.weight"])


def test_frozen_dtype_leaves_the_unconditional_transformer_in_the_denoisers():
    """The pipeline runs both transformers at one timestep dtype (the conditional one's): ``frozen_dtype`` casts the
    VAE and text encoder, not the frozen twin."""
    torch.manual_seed(0)
    module = ideogram4(frozen_dtype="bfloat16")
    assert module.text_encoder.dtype == torch.bfloat16
    assert module.unconditional_transformer.dtype == module.denoiser.dtype == torch.float32
    images = module.generate(prompts=PROMPTS[:1], seeds=[0])
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_the_export_samples_the_modules_images_in_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    module = ideogram4()
    perturb_all(module)
    expected, pipe = checks.export_and_load(module, tmp_path / "export", "Ideogram4Pipeline", PROMPTS)
    # A plain call: guidance w is the pipeline's constant guidance_scale, the blend w cond + (1 - w) uncond.
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    plain = pipe(list(PROMPTS), height=32, width=32, num_inference_steps=2, guidance_scale=2.5, guidance_schedule=None,
                 max_sequence_length=24, generator=generators, output_type="pt").images  # fmt: skip
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-5)
    # The unconditional transformer is part of the images: another one gives others.
    with torch.no_grad():
        for p in pipe.unconditional_transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(checks.pipe_sample(module, pipe, PROMPTS, [3, 4], 2.5), expected, atol=1e-3)
    record = json.loads((tmp_path / "export" / "lightning_ft.json").read_text())
    assert record["pipeline_call"] == {"max_sequence_length": 24}  # the tokenizer's cap, not the pipeline's 2048
    with pytest.raises(ValueError, match="no negative prompt"):
        module.generate(prompts=PROMPTS, seeds=[3, 4], negative_prompt="blurry")


def test_lora_only_export_loads_with_load_lora_weights(tmp_path):
    torch.manual_seed(0)
    module = ideogram4(trainable="lora", lora_rank=2, lora_alpha=4)
    perturb_all(module)
    assert checks.lora_targets(module) == {"to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"}  # the script's default
    assert not any("lora" in n for n, _ in module.unconditional_transformer.named_parameters())

    def base():
        base = ideogram4()
        perturb_all(base, weights=False)  # the module's base weights and statistics
        return base

    checks.check_lora_only_export(module, tmp_path, base, PROMPTS)


def test_the_modular_pipeline_is_refused_by_name_and_the_family_is_recognised(tmp_path):
    torch.manual_seed(0)
    module = ideogram4()
    parts = module.parts
    assert detect_family(Components(parts.denoiser, parts.scheduler, parts.vae)) == "ideogram4"
    module.save_pretrained(tmp_path / "folder")
    checks.check_refused_by_name(tmp_path / "folder", "Ideogram4ModularPipeline")


def test_a_model_without_its_unconditional_transformer_is_refused():
    components = {k: v for k, v in tiny_components("tiny_ideogram4").items() if k != "unconditional_transformer"}
    with pytest.raises(ValueError, match="needs its unconditional_transformer"):
        DreamBooth(components=components, sample_resolution=32)


def test_bnn_fsdp_and_a3fta_find_their_layers():
    torch.manual_seed(0)
    names = tiny_module(BayesianFineTuning, "tiny_ideogram4").bayesian_names
    assert {n.split(".")[0] for n in names} == {"layers"}
    assert {n.split(".", 2)[2] for n in names} == {"attention.to_q", "attention.to_k", "attention.to_v",
                                                   "attention.to_out.0", "feed_forward.w1", "feed_forward.w2",
                                                   "feed_forward.w3"}  # fmt: skip
    assert Ideogram4TransformerBlock in fsdp_block_classes()
    module = tiny_module(AdapterAttentionFineTuning, "tiny_ideogram4")
    adapted = sorted(n for n, m in module.denoiser.named_modules() if type(m).__name__ == "AdaptedProjection")
    assert adapted == ["layers.0.attention.to_out.0", "layers.1.attention.to_out.0"]
    assert not any(type(m).__name__ == "AdaptedProjection" for m in module.unconditional_transformer.modules())
    with torch.no_grad():
        x, t = torch.randn(2, 16, 8, 8), torch.tensor([100, 800])
        module.predict(x, t, module.encode_prompts(PROMPTS))  # the tap reads the (B, D) time embedding
    assert (REPO / "configs/model/tiny_ideogram4.yaml").is_file()
