"""Chroma: conditions equal ``ChromaPipeline.encode_prompt`` (T5 under the tokenizer's mask, the transformer's text
mask with one padding token kept), the transformer is called as the pipeline calls it (mask over text and image
tokens, sigma, no pooled projection, no guidance), the training loss equals the reference's on the same batch, noise
and timesteps (diffusers has no Chroma training script: its Flux.1 DreamBooth-LoRA script, with the transformer called
as ChromaPipeline calls it), the full and LoRA-only exports sample the module's images in plain diffusers, and the
pipeline's image-conditioned variants are refused by name."""

from __future__ import annotations

import family_checks as checks
import pytest
import torch
from conftest import REPO, perturb, tiny_components, tiny_module
from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock, ChromaTransformerBlock
from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift
from diffusers.training_utils import compute_loss_weighting_for_sd3

from lightning_ft.core.families import Flux, detect_family, fsdp_block_classes
from lightning_ft.core.families.chroma import Chroma
from lightning_ft.core.families.joint_transformer import JointTransformerFamily
from lightning_ft.methods import AdapterAttentionFineTuning, DreamBooth

PROMPTS = ["a sks star on a gray background", "a red circle"]
CLASS_PROMPTS = ["a star on a gray background", "a blue square"]
#: Ten words: with <bos> and <eos> the prompt fills the tiny tokenizer's 12 tokens (no padding token to keep).
FULL = "a sks star on a gray background on a navy"
LENGTH = 12  # the pipeline's 512, capped by the tiny tokenizer's model_max_length


def chroma(**kwargs):
    return tiny_module(DreamBooth, "tiny_chroma", **kwargs)


def test_chroma_is_a_sibling_of_flux_and_is_detected_from_its_transformer():
    assert issubclass(Chroma, JointTransformerFamily) and not issubclass(Chroma, Flux)
    module = chroma()
    assert module.family.name == "chroma" and detect_family(module.parts) == "chroma"
    assert not Flux.matches(module.parts)
    assert module.family.text_encoders == ("text_encoder",) and module.family.max_sequence_length == LENGTH


def test_conditions_are_the_pipelines_encode_prompt():
    torch.manual_seed(0)
    module = chroma().eval()
    pipe = module.build_pipeline()
    assert isinstance(pipe, ChromaPipeline)
    prompts = [*PROMPTS, FULL]
    embeds, text_ids, mask, negative, _, negative_mask = pipe.encode_prompt(prompts, max_sequence_length=LENGTH)
    cond = module.encode_prompts([*prompts, ""])
    states, got_mask = cond.fields["encoder_hidden_states"], cond.fields["encoder_attention_mask"]
    torch.testing.assert_close(states, torch.cat([embeds, negative[:1]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(got_mask.float(), torch.cat([mask, negative_mask[:1]]), rtol=0, atol=0)
    assert text_ids.abs().sum() == 0 and text_ids.shape == (LENGTH, 3)
    # Chroma's rule: the prompt's tokens (<bos> words <eos>) and the first padding token; a full prompt keeps all.
    ids, tokenizer_mask = module.family.tokenize(module.parts, [*prompts, ""])
    assert tokenizer_mask.sum(1).tolist() == [9, 5, 12, 2]
    assert got_mask.sum(1).tolist() == [10, 6, 12, 3]
    # T5 reads the tokenizer's mask (Flux.1's pipeline passes none): unmasked, the states differ.
    unmasked = module.text_encoder(ids[0][None])[0]
    assert not torch.allclose(unmasked, states[:1], atol=1e-4)
    # The null condition is the pipeline's negative branch (its default negative prompt "").
    null = module.null_condition(1)
    torch.testing.assert_close(null.fields["encoder_hidden_states"], negative[:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(null.fields["encoder_attention_mask"].float(), negative_mask[:1], rtol=0, atol=0)


def test_the_transformer_is_called_as_the_pipeline_calls_it():
    """One guided pipeline call captured at the transformer (both branches, every step): the family's call on the
    same packed latents and 1000 sigma gives the same outputs, with the same mask; the mask is not a no-op."""
    torch.manual_seed(0)
    module = chroma().eval()
    perturb(module)
    pipe = module.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = module.denoiser.register_forward_hook(lambda m, a, k, out: calls.append((k, out[0])), with_kwargs=True)
    pipe(list(PROMPTS), guidance_scale=3.0, num_inference_steps=2, output_type="latent",
         generator=torch.Generator().manual_seed(0), **module.family.pipeline_call_kwargs(module))  # fmt: skip
    hook.remove()
    assert len(calls) == 4  # 2 steps x (prompt, negative)
    cond = module.encode_prompts(PROMPTS)
    null = module.null_condition(2)
    for i, (kwargs, out) in enumerate(calls):
        assert set(kwargs) >= {"hidden_states", "timestep", "encoder_hidden_states", "attention_mask"}
        assert "pooled_projections" not in kwargs and "guidance" not in kwargs
        latents = Flux.unpack(kwargs["hidden_states"], 16, 16)
        which = cond if i % 2 == 0 else null
        with torch.no_grad():
            got = module.family.denoise(module.denoiser, latents, 1000 * kwargs["timestep"], which)
        torch.testing.assert_close(got, Flux.unpack(out, 16, 16), rtol=0, atol=1e-5)
        text_mask = which.fields["encoder_attention_mask"].float()
        torch.testing.assert_close(kwargs["attention_mask"], torch.cat([text_mask, torch.ones(2, 64)], dim=1))
    kwargs = calls[0][0]
    latents, t = Flux.unpack(kwargs["hidden_states"], 16, 16), 1000 * kwargs["timestep"]
    with torch.no_grad():
        masked = module.family.denoise(module.denoiser, latents, t, cond)
        ones = cond.replace(encoder_attention_mask=torch.ones_like(cond.fields["encoder_attention_mask"]))
        assert not torch.allclose(module.family.denoise(module.denoiser, latents, t, ones), masked, atol=1e-4)
        # The float mask is added to the attention logits: the padding it masks still counts, so its states are
        # the pipeline's (not zeros, as the Z-Image and Qwen-Image families may keep them).
        kept = cond.fields["encoder_attention_mask"].bool()[..., None]
        states = cond.fields["encoder_hidden_states"]
        other = cond.replace(encoder_hidden_states=torch.where(kept, states, torch.zeros_like(states)))
        assert not torch.allclose(module.family.denoise(module.denoiser, latents, t, other), masked, atol=1e-4)


def script_loss(pipe, scheduler, pixels, prompts, noise, u, seed, prior=False, mu=None):
    """diffusers' train_dreambooth_lora_flux.py, one step on given noise and u (its density draw), the VAE draw from
    the global RNG seeded by ``seed``, with the transformer called as ChromaPipeline calls it (the script's Flux call
    has CLIP's pooled projection and a guidance value; Chroma's takes T5's states and their mask). Prior preservation
    (the batch's second half: class images) when ``prior``. ``mu``: shift its sigmas as ChromaPipeline samples a
    dynamic scheduler (the script does not)."""
    vae, transformer = pipe.vae, pipe.transformer
    torch.manual_seed(seed)
    model_input = vae.encode(pixels).latent_dist.sample()
    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = model_input.shape
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, model_input.device, model_input.dtype)
    timesteps, sigmas = checks.script_draw(scheduler, u, mu)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed = pipe._pack_latents(noisy_model_input, b, c, h, w)
    # Chroma's conditioning as the pipeline builds it: T5 states, zero txt_ids, the text mask extended over the image.
    prompt_embeds, text_ids, prompt_mask, *_ = pipe.encode_prompt(
        list(prompts), do_classifier_free_guidance=False, max_sequence_length=LENGTH
    )
    attention_mask = pipe._prepare_attention_mask(b, packed.shape[1], packed.dtype, prompt_mask)
    model_pred = transformer(
        hidden_states=packed, timestep=timesteps / 1000, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
        img_ids=latent_image_ids, attention_mask=attention_mask, return_dict=False,
    )[0]  # fmt: skip
    model_pred = pipe._unpack_latents(model_pred, h * vae_scale_factor, w * vae_scale_factor, vae_scale_factor)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
    target = noise - model_input
    return checks.script_mse(model_pred, target, weighting, prior, chunk_weighting=True)


@pytest.mark.parametrize("prior", [False, True])
def test_the_training_loss_is_the_references_with_flow_shift_1_and_the_default_is_the_pipelines_shift(prior):
    """The tiny scheduler is dynamic (Flux's): the script trains on its unshifted table, ``flow_shift=1.0`` gives
    that loss; lightning-ft's default trains at the shift ChromaPipeline samples 32 px images with (exp(mu))."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_components("tiny_chroma")["scheduler"]["config"])
    batch, pixels, prompts, noise, u = checks.dreambooth_batch(PROMPTS, CLASS_PROMPTS, (4, 16, 16), prior)
    t = 999 - (u * 1000).long()  # lightning-ft's t counts up with the noise; diffusers' table index counts down
    losses = {}
    for shift in (1.0, None):
        torch.manual_seed(0)
        module = chroma(flow_shift=shift)
        perturb(module)
        # ChromaPipeline's mu: (16 / 2) * (16 / 2) image tokens of 32 px images, the scheduler's settings.
        mu = None if shift == 1.0 else calculate_shift(8 * 8, 256, 4096, 0.5, 1.15)
        with torch.no_grad():
            expected = script_loss(module.build_pipeline(), scheduler, pixels, prompts, noise, u, 7, prior, mu)
        losses[shift] = checks.fixed_draws_loss(module, batch, t, noise, seed=7)
        print(f"prior={prior} flow_shift={shift}: reference {expected.item():.8f} lightning-ft {losses[shift]:.8f}")
        assert abs(losses[shift].item() - expected.item()) <= 1e-6
    assert abs(losses[None] - losses[1.0]) > 1e-4  # the default is the other objective, on purpose


def test_the_export_samples_the_modules_images_in_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    module = chroma()
    perturb(module)
    expected, pipe = checks.export_and_load(module, tmp_path / "export", "ChromaPipeline", PROMPTS)
    # A plain call: guidance_scale is the framework's w, the negative prompt the pipeline's default "".
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    plain = pipe(list(PROMPTS), height=32, width=32, num_inference_steps=2, guidance_scale=2.5, generator=generators,
                 max_sequence_length=LENGTH, output_type="pt").images  # fmt: skip
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-5)
    # w = 1 is the conditional branch alone (the pipeline guides for w > 1 only).
    unguided = module.generate(prompts=PROMPTS, seeds=[3, 4], guidance_scale=1.0)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    alone = pipe(list(PROMPTS), height=32, width=32, num_inference_steps=2, guidance_scale=1.0, generator=generators,
                 max_sequence_length=LENGTH, output_type="pt").images  # fmt: skip
    torch.testing.assert_close(alone, unguided, rtol=0, atol=1e-5)
    assert not torch.allclose(unguided, expected, atol=1e-3)
    # lightning-ft loads the export back as a Chroma model.
    generate = {"prompts": PROMPTS, "seeds": [3, 4], "guidance_scale": 2.5}
    reloaded = checks.check_loads_back(tmp_path / "export", "chroma", expected, generate, sample_resolution=32)
    assert reloaded.family.max_sequence_length == LENGTH


def test_lora_only_export_loads_with_load_lora_weights(tmp_path):
    torch.manual_seed(0)
    module = chroma(trainable="lora", lora_rank=2, lora_alpha=4)
    perturb(module)
    assert checks.lora_targets(module) == set(Flux.lora_targets)
    lora = {n.split(".")[0] for n, _ in module.denoiser.named_parameters() if "lora" in n}
    assert lora == {"transformer_blocks", "single_transformer_blocks"}
    with pytest.raises(NotImplementedError, match="'chroma' family has no kohya LoRA layout"):
        module.save_pretrained(tmp_path / "kohya", lora_only=True, lora_format="kohya")
    checks.check_lora_only_export(module, tmp_path, chroma, PROMPTS)


@pytest.mark.parametrize("variant", ["ChromaImg2ImgPipeline", "ChromaInpaintPipeline"])
def test_image_conditioned_variants_are_refused_by_name(variant, tmp_path):
    torch.manual_seed(0)
    chroma().save_pretrained(tmp_path / "folder")
    checks.check_refused_by_name(tmp_path / "folder", variant)


def test_bnn_fsdp_and_a3fta_find_their_layers():
    torch.manual_seed(0)
    module = chroma()
    chosen = checks.bnn_chosen(module)
    assert {n.split(".")[0] for n in chosen} == {"transformer_blocks", "single_transformer_blocks"}
    assert any(n.endswith("attn.to_q") for n in chosen) and any(n.endswith("proj_mlp") for n in chosen)
    assert not any("add_" in n or "ff_context" in n or "distilled_guidance_layer" in n for n in chosen)
    assert {ChromaTransformerBlock, ChromaSingleTransformerBlock} <= fsdp_block_classes()
    # A3FTA: adapters on the double blocks' joint attention (the single blocks' has no output projection), fed the
    # approximator's modulations averaged to one vector per sample.
    torch.manual_seed(0)
    a3fta = tiny_module(AdapterAttentionFineTuning, "tiny_chroma")
    from lightning_ft.nn.adapters import AdaptedProjection

    adapted = [n for n, m in a3fta.denoiser.named_modules() if isinstance(m, AdaptedProjection)]
    assert adapted == ["transformer_blocks.0.attn.to_out.0"]
    tap = a3fta.denoiser.get_submodule(adapted[0]).tap
    assert tap.dim == a3fta.denoiser.inner_dim
    with torch.no_grad():
        a3fta.predict(torch.randn(2, 4, 16, 16), torch.tensor([100, 800]), a3fta.encode_prompts(PROMPTS))
    assert tap.value.shape == (2, a3fta.denoiser.inner_dim)
    assert (REPO / "configs/model/tiny_chroma.yaml").is_file()
