"""FLUX.1 Kontext: conditions equal ``FluxKontextPipeline.encode_prompt`` and its source-image latents and ids
(``prepare_latents``); the transformer is called as the pipeline calls it (target tokens, then source tokens, output
cut to the target's); the training loss equals diffusers' ``train_dreambooth_lora_flux_kontext.py``'s (image-to-image,
``--cond_image_column``) on the same batch, noise and timesteps (with ``model.flow_shift: 1.0``; the default trains at
the pipeline's resolution-dependent shift); the full and LoRA-only exports sample the module's images in plain
diffusers given the same sources; what does not apply is refused by name."""

from __future__ import annotations

import json

import family_checks as checks
import pytest
import torch
from conftest import REPO, perturb, tiny_module
from diffusers import DiffusionPipeline, FluxKontextPipeline
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.training_utils import compute_loss_weighting_for_sd3

from lightning_ft.core.families import detect_family, fsdp_block_classes
from lightning_ft.core.families.flux_kontext import FluxKontext
from lightning_ft.methods import BayesianFineTuning, DiffTuning, DreamBooth

PROMPTS = ["a sks star on a gray background", "a red circle"]


def kontext(cls=DreamBooth, **kwargs):
    return tiny_module(cls, "tiny_flux_kontext", family="flux_kontext", **kwargs)


def pipeline_call(pipe, prompts, images, seeds, guidance):
    """A plain ``FluxKontextPipeline`` call on sources kept at their size (what the family documents)."""
    pipe.set_progress_bar_config(disable=True)
    h, w = images.shape[-2:]
    return pipe(image=images, prompt=prompts, guidance_scale=guidance, num_inference_steps=2, height=h, width=w,
                max_area=h * w, _auto_resize=False, max_sequence_length=512,
                generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images  # fmt: skip


def test_conditions_source_latents_and_ids_are_the_pipelines():
    torch.manual_seed(0)
    module = kontext().eval()
    perturb(module)
    pipe = module.build_pipeline()
    assert module.family.name == "flux_kontext" and type(pipe).__name__ == "FluxKontextPipeline"
    images = checks.sources()
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=512)
    cond = module.with_source(module.encode_prompts(PROMPTS), PROMPTS, images)
    torch.testing.assert_close(cond.fields["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.fields["text_embeds"], pooled, rtol=0, atol=1e-6)
    # The pipeline's own preprocessing and prepare_latents: image latents (mode, shifted and scaled) and ids.
    processed = pipe.image_processor.preprocess(images, 32, 32)
    latents, image_latents, latent_ids, image_ids = pipe.prepare_latents(
        processed, 2, 4, 32, 32, torch.float32, "cpu", torch.Generator().manual_seed(0)
    )
    own = cond.fields["source_latents"]
    assert own.shape == (2, 4, 16, 16)
    torch.testing.assert_close(FluxKontext.pack(own), image_latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(FluxKontext.source_ids(16, 16, "cpu", torch.float32), image_ids)
    torch.testing.assert_close(FluxKontext.image_ids(16, 16, "cpu", torch.float32), latent_ids)
    assert image_ids[:, 0].eq(1).all() and latent_ids[:, 0].eq(0).all()
    wide = FluxKontextPipeline._prepare_latent_image_ids(1, 8, 12, "cpu", torch.float32)  # a 32 x 48 px source
    wide[..., 0] = 1
    torch.testing.assert_close(FluxKontext.source_ids(16, 24, "cpu", torch.float32), wide)
    # The transformer is called as the pipeline's loop calls it.
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([300, 800])
    with torch.no_grad():
        got = module.predict(x, t, cond)
        sigma = module.noise_process.model_timesteps(t, x) / 1000
        out = module.denoiser(hidden_states=torch.cat([FluxKontextPipeline._pack_latents(x, 2, 4, 16, 16),
                                                       image_latents], 1),
                              timestep=sigma, guidance=torch.full((2,), 3.5), pooled_projections=pooled,
                              encoder_hidden_states=embeds, txt_ids=text_ids,
                              img_ids=torch.cat([latent_ids, image_ids])).sample[:, :64]  # fmt: skip
        torch.testing.assert_close(got, FluxKontextPipeline._unpack_latents(out, 32, 32, 2), rtol=0, atol=1e-5)
        # The source matters: another source, another prediction.
        other = module.with_source(module.encode_prompts(PROMPTS), PROMPTS, checks.sources(seed=4))
        assert not torch.allclose(module.predict(x, t, other), got, atol=1e-4)
    # Condition dropout keeps the source: the null input is the empty prompt with the same image.
    module.train()
    module.hparams.condition_dropout = 1.0
    batch = {"pixel_values": images * 2 - 1, "prompts": PROMPTS, "source_values": images}
    dropped = module.encode_conditions(batch)
    null = pipe.encode_prompt(["", ""], ["", ""], max_sequence_length=512)[0]
    torch.testing.assert_close(dropped.fields["encoder_hidden_states"], null, rtol=0, atol=1e-6)
    torch.testing.assert_close(dropped.fields["source_latents"], own, rtol=0, atol=1e-6)


def script_loss(module, batch, x0, noise, indices):
    """train_dreambooth_lora_flux_kontext.py's loss with --cond_image_column, step by step, on target latents ``x0``
    (the script's vae-encoded model_input), ``noise`` and the schedule positions ``indices`` (its (u * T).long())."""
    vae, transformer = module.vae, module.denoiser
    pipe = module.build_pipeline()
    # The script's scheduler copy (the model's scheduler: shift 3.0 with use_dynamic_shifting, so its table is
    # unshifted) and get_sigmas.
    scheduler = type(module.noise_scheduler).from_config(module.noise_scheduler.config)
    embeds, pooled, text_ids = pipe.encode_prompt(batch["prompts"], batch["prompts"], max_sequence_length=512)
    cond_pixel_values = batch["source_values"] * 2 - 1  # the script's cond images: normalised to [-1, 1]
    cond_model_input = vae.encode(cond_pixel_values).latent_dist.mode()  # --vae_encode_mode mode (default)
    cond_model_input = (cond_model_input - vae.config.shift_factor) * vae.config.scaling_factor
    model_input = x0
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    b, c, h, w = model_input.shape
    latent_image_ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    cond_latents_ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    cond_latents_ids[..., 0] = 1
    latent_image_ids = torch.cat([latent_image_ids, cond_latents_ids], dim=0)
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxKontextPipeline._pack_latents(noisy_model_input, b, c, h, w)
    orig_inp_shape = packed.shape
    packed_cond = FluxKontextPipeline._pack_latents(cond_model_input, b, c, h, w)
    packed = torch.cat([packed, packed_cond], dim=1)
    guidance = torch.tensor([3.5]).expand(b)  # --guidance_scale 3.5 (default)
    model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                             pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                             img_ids=latent_image_ids, return_dict=False)[0]  # fmt: skip
    model_pred = model_pred[:, : orig_inp_shape[1]]
    model_pred = FluxKontextPipeline._unpack_latents(model_pred, h * vae_scale_factor, w * vae_scale_factor,
                                                     vae_scale_factor)  # fmt: skip
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
    return checks.script_mse(model_pred, noise - model_input, weighting, prior=False, chunk_weighting=True)


def test_training_loss_is_the_scripts_with_flow_shift_1_and_the_default_shift_is_the_pipelines():
    checks.check_edit_loss_at_both_shifts(kontext, script_loss, PROMPTS, (4, 16, 16))


def test_export_samples_the_modules_images_in_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    module = kontext()
    perturb(module)
    images = checks.sources()
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0, sources=images)
    assert expected.shape == (2, 3, 32, 32)
    module.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxKontextPipeline"
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe).__name__ == "FluxKontextPipeline"
    torch.testing.assert_close(pipeline_call(pipe, PROMPTS, images, [0, 1], 2.0).float(), expected, rtol=0,
                               atol=1e-5)  # fmt: skip
    assert not torch.allclose(expected[0], expected[1])
    # The sources matter, and the reloaded folder is the flux_kontext family again.
    other = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0, sources=checks.sources(seed=9))
    assert not torch.allclose(other, expected, atol=1e-4)
    assert DreamBooth(pretrained=str(tmp_path), sample_steps=2, sample_resolution=32).family.name == "flux_kontext"


def test_lora_only_export_loads_with_load_lora_weights(tmp_path):
    torch.manual_seed(0)
    module = kontext(trainable="lora", lora_rank=2, lora_alpha=4)
    perturb(module)
    images = checks.sources()
    sample = lambda pipe: pipeline_call(pipe, PROMPTS, images, [0, 1], 2.0)
    checks.check_lora_only_export(module, tmp_path, kontext, PROMPTS, sample=sample, differs=1e-4, sources=images)
    assert {"to_q", "add_q_proj", "proj_mlp", "ff.net.2"} <= checks.lora_targets(module)  # Flux's targets


def test_variant_pipelines_and_what_does_not_apply_are_refused_by_name(tmp_path):
    torch.manual_seed(0)
    module = kontext()
    # A bare FluxTransformer2DModel is Flux.1; Kontext is chosen by its pipeline or by model.family.
    assert detect_family(module.parts) == "flux"
    module.save_pretrained(tmp_path)
    name = "FluxKontextInpaintPipeline"
    checks.check_refused_by_name(tmp_path, name, f"{name}.*inpaints", sample_steps=2)
    # Samples need sources; a text-to-image family takes none.
    with pytest.raises(ValueError, match="flux_kontext family is an editing model: give sources"):
        module.generate(prompts=PROMPTS, seeds=[0, 1])
    with pytest.raises(ValueError, match=r"sources of shape \(1, 3, 32, 32\)"):
        module.generate(prompts=PROMPTS, seeds=[0, 1], sources=checks.sources(1))
    flux = tiny_module(DreamBooth, "tiny_flux")
    with pytest.raises(ValueError, match="flux family is not an editing model.*flux_kontext"):
        flux.generate(prompts=PROMPTS, seeds=[0, 1], sources=checks.sources())
    with pytest.raises(ValueError, match="not an editing model"):
        flux.encode_conditions(
            {"pixel_values": checks.sources() * 2 - 1, "prompts": PROMPTS, "source_values": checks.sources()}
        )
    with pytest.raises(ValueError, match="editing model: its batches need source images"):
        module.encode_conditions({"pixel_values": checks.sources() * 2 - 1, "prompts": PROMPTS})
    # Diff-Tuning's memory bank is sampled from the null input without a source: refused by name.
    with pytest.raises(ValueError, match="Diff-Tuning.*editing model.*does not apply"):
        kontext(DiffTuning, memory_size=2)


def test_bnn_fsdp_and_a3fta_find_their_layers():
    torch.manual_seed(0)
    module = kontext(BayesianFineTuning)
    parts = {n.split(".", 2)[2] for n in module.bayesian_names}
    assert {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"} <= parts
    assert not any("norm" in p or "add_" in p or "ff_context" in p for p in parts)
    assert {FluxTransformerBlock, FluxSingleTransformerBlock} <= fsdp_block_classes()
    names = {n.rsplit(".", 1)[-1] for n, _ in module.denoiser.named_modules()}
    assert "attn" in names and module.family.attention_names == ("attn", "attn2")
    assert (REPO / "configs/model/tiny_flux_kontext.yaml").is_file()
