"""Qwen-Image: conditions equal ``QwenImagePipeline.encode_prompt`` (template tokens dropped, states and mask) and
the transformer's output does not depend on the fixed-length padding the text cache needs; the training loss is the
DreamBooth-LoRA script's on the same batch, noise and timesteps (with ``model.flow_shift: 1.0``; the default trains at
the pipeline's resolution-dependent shift); the export and the LoRA-only export sample the module's images in plain
diffusers; guidance is the pipeline's true CFG; variant pipelines and transformers are refused by name."""

from __future__ import annotations

import json

import family_checks as checks
import pytest
import torch
from conftest import perturb, tiny_components, tiny_module
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lightning_ft.core.families import Flux, detect_family
from lightning_ft.core.families.qwen_image import QwenImage
from lightning_ft.methods import BayesianFineTuning, DreamBooth

PROMPTS = ["a sks star on a gray background", "a red circle"]


def qwen(**kwargs):
    return tiny_module(DreamBooth, "tiny_qwen_image", **kwargs)


def pipeline_call(pipe, prompts, seeds, guidance):
    """A plain ``QwenImagePipeline`` call, true CFG with the empty negative prompt as the family documents."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, negative_prompt=[""] * len(prompts), true_cfg_scale=guidance, num_inference_steps=2,
                height=32, width=32, generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="pt").images  # fmt: skip


def test_conditions_are_the_pipelines_encode_prompt_and_padding_changes_no_output():
    torch.manual_seed(0)
    module = qwen().eval()
    family, pipe = module.family, module.build_pipeline()
    assert family.name == "qwen_image" and family.max_sequence_length == 16  # 512, capped by the tiny tokenizer
    # The 34 tokens the pipeline drops are exactly the template's system turn and "<|im_start|>user\n".
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(module.tokenizer(prefix).input_ids) == family.drop == pipe.prompt_template_encode_start_idx == 34
    prompts = [*PROMPTS, ""]
    embeds, mask = pipe.encode_prompt(prompts, max_sequence_length=16)
    cond = module.encode_prompts(prompts)
    states, own_mask = cond.fields["encoder_hidden_states"], cond.fields["encoder_attention_mask"]
    length = embeds.shape[1]
    assert states.shape == (3, 16, 16) and length == 12  # 7 words + "<|im_end|>\n<|im_start|>assistant\n"
    torch.testing.assert_close(states[:, :length], embeds, rtol=0, atol=1e-6)
    assert torch.equal(own_mask[:, :length], mask) and not own_mask[:, length:].any() and mask.dtype == torch.long
    assert mask.sum(1).tolist() == [12, 8, 5] and not states[own_mask == 0].any()
    # Packing is the pipeline's, and the transformer gets the pipeline's very inputs (cut to the longest prompt).
    x = torch.randn(3, 4, 8, 8)
    packed = QwenImagePipeline._pack_latents(x, 3, 4, 8, 8)
    assert torch.equal(Flux.pack(x), packed)  # the layout QwenImage.denoise packs with
    assert torch.equal(Flux.unpack(packed, 8, 8), QwenImagePipeline._unpack_latents(packed, 32, 32, 4)[:, :, 0])
    t = torch.tensor([100, 500, 900])
    with torch.no_grad():
        got = module.predict(x, t, cond)
        sigma = module.noise_process.model_timesteps(t, x) / 1000
        shapes = [[(1, 4, 4)]] * 3
        out = module.denoiser(hidden_states=packed, timestep=sigma, encoder_hidden_states=embeds,
                              encoder_hidden_states_mask=mask, img_shapes=shapes).sample  # fmt: skip
        torch.testing.assert_close(got, QwenImagePipeline._unpack_latents(out, 32, 32, 4)[:, :, 0], rtol=0, atol=1e-6)
        # The full fixed-length padding with its mask gives the same output: padded text tokens change nothing.
        padded = module.denoiser(hidden_states=packed, timestep=sigma, encoder_hidden_states=states,
                                 encoder_hidden_states_mask=own_mask, img_shapes=shapes).sample  # fmt: skip
        torch.testing.assert_close(padded, out, rtol=0, atol=1e-6)
        # One prompt alone: encode_prompt returns no mask (all valid), and so does the cut.
        one, none = pipe.encode_prompt(PROMPTS[:1], max_sequence_length=16)
        assert none is None and family.context(cond[:1])[1] is None
        torch.testing.assert_close(family.context(cond[:1])[0], one, rtol=0, atol=1e-6)
    # Different prompts, different conditions: the drop leaves every word of the prompt.
    assert not torch.allclose(states[0], states[1])


def script_loss(module, batch, noise, u_seed, mu=None):
    """train_dreambooth_lora_qwen_image.py's loss on ``batch`` (instance + class images, prior preservation), step by
    step, with ``noise`` (B, C, H, W) and u drawn from a generator seeded ``u_seed``. ``mu``: the sigma table shifted
    by the pipeline's resolution-dependent shift (the scheduler's ``time_shift``) instead of the script's table."""
    vae, transformer = module.vae, module.denoiser
    config = tiny_components("tiny_qwen_image")["scheduler"]["config"]
    # The script: FlowMatchEulerDiscreteScheduler.from_pretrained(..., subfolder="scheduler", shift=3.0).
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, shift=3.0)
    pipe = QwenImagePipeline(scheduler=None, vae=None, transformer=None, text_encoder=module.text_encoder,
                             tokenizer=module.tokenizer)  # fmt: skip
    vae_scale_factor = 2 ** len(vae.temperal_downsample)
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
    # compute_text_embeddings of the instance and class prompts, concatenated as concat_prompt_embedding_batches.
    pairs = [pipe.encode_prompt(prompt=p, max_sequence_length=16) for p in batch["prompts"] + batch["class_prompts"]]
    longest = max(e.shape[1] for e, _ in pairs)
    embeds = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[1])) for e, _ in pairs])
    mask = torch.cat([torch.nn.functional.pad(torch.ones(e.shape[:2], dtype=torch.long), (0, longest - e.shape[1]))
                      for e, _ in pairs])  # fmt: skip
    mask = None if mask.all() else mask
    pixel_values = torch.cat([batch["pixel_values"], batch["class_pixel_values"]]).unsqueeze(2)  # collate_fn
    torch.manual_seed(1234)  # the posterior draw
    model_input = vae.encode(pixel_values).latent_dist.sample()
    model_input = (model_input - latents_mean) * latents_std
    noise = noise.unsqueeze(2)
    bsz = model_input.shape[0]
    generator = torch.Generator().manual_seed(u_seed)
    u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=bsz, logit_mean=0.0, logit_std=1.0,
                                              mode_scale=1.29, generator=generator)  # fmt: skip
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1, 1)  # get_sigmas: the table's sigma at each timestep
    assert torch.allclose(sigmas.flatten(), 1 - indices / 1000)  # shift=3.0 is ignored: use_dynamic_shifting
    if mu is not None:
        sigmas = scheduler.time_shift(mu, 1.0, sigmas)
        timesteps = sigmas.flatten() * 1000
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    latent_height, latent_width = model_input.shape[3], model_input.shape[4]
    img_shapes = [(1, latent_height // 2, latent_width // 2)] * bsz
    noisy_model_input = noisy_model_input.permute(0, 2, 1, 3, 4)
    packed = QwenImagePipeline._pack_latents(noisy_model_input, bsz, model_input.shape[1], latent_height, latent_width)
    model_pred = transformer(hidden_states=packed, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                             timestep=timesteps / 1000, img_shapes=img_shapes, return_dict=False)[0]  # fmt: skip
    model_pred = QwenImagePipeline._unpack_latents(
        model_pred, latent_height * vae_scale_factor, latent_width * vae_scale_factor, vae_scale_factor
    )
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
    target = noise - model_input
    return checks.script_mse(model_pred, target, weighting, prior=True, chunk_weighting=True)


@pytest.mark.parametrize("flow_shift", [1.0, None])
def test_training_loss_is_the_scripts(flow_shift, monkeypatch):
    torch.manual_seed(0)
    module = qwen(flow_shift=flow_shift, trainable="lora", lora_rank=2)
    perturb(module)
    checks.check_loss_at_both_shifts(module, script_loss, calculate_shift, flow_shift, monkeypatch, PROMPTS)


def test_export_samples_the_modules_images_in_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    module = qwen()
    perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0)
    module.save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe).__name__ == "QwenImagePipeline" and type(pipe.vae).__name__ == "AutoencoderKLQwenImage"
    torch.testing.assert_close(pipeline_call(pipe, PROMPTS, [0, 1], 2.0).float(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1])


def test_lora_only_export_loads_with_load_lora_weights(tmp_path):
    torch.manual_seed(0)
    module = qwen(trainable="lora", lora_rank=2, lora_alpha=4)
    perturb(module)
    sample = lambda pipe: pipeline_call(pipe, PROMPTS, [0, 1], 2.0)
    checks.check_lora_only_export(module, tmp_path, qwen, PROMPTS, sample=sample, differs=1e-4)
    # The script's default targets: q/k/v/out of the image stream of every block's joint attention.
    assert checks.lora_targets(module) == {"to_q", "to_k", "to_v", "to_out.0"}
    lora = {n for n, _ in module.denoiser.named_parameters() if "lora_A" in n}
    assert len(lora) == 2 * 4 and all(".attn.to_" in n for n in lora)


def test_guidance_is_the_pipelines_true_cfg_with_the_empty_negative_prompt(monkeypatch):
    torch.manual_seed(0)
    module = qwen()
    calls = checks.record_calls(monkeypatch, QwenImagePipeline)
    guided = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=3.0)
    plain = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=1.0)
    assert calls[0]["true_cfg_scale"] == 3.0 and calls[0]["negative_prompt"] == ["", ""]
    assert calls[1]["negative_prompt"] is None and "guidance_scale" not in calls[0]  # not a distilled model
    assert calls[0]["max_sequence_length"] == 16 and calls[0]["height"] == calls[0]["width"] == 32
    assert not torch.allclose(guided, plain, atol=1e-4)


def test_bnn_selects_the_image_stream_of_the_blocks():
    torch.manual_seed(0)
    names = tiny_module(BayesianFineTuning, "tiny_qwen_image").bayesian_names
    parts = {n.split(".", 2)[2] for n in names}
    assert parts == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2"}


def test_variant_pipelines_are_refused_by_name(tmp_path):
    torch.manual_seed(0)
    module = qwen()
    assert detect_family(module.parts) == "qwen_image"
    module.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
    for variant in ["QwenImageEditPlusPipeline", "QwenImageImg2ImgPipeline",
                    "QwenImageInpaintPipeline", "QwenImageControlNetPipeline", "QwenImageLayeredPipeline"]:  # fmt: skip
        assert variant in QwenImage.refused
        checks.check_refused_by_name(tmp_path, variant, sample_steps=2)


def test_variant_transformers_are_refused_naming_the_setting():
    components = tiny_components("tiny_qwen_image")
    components["denoiser"]["config"] = {**components["denoiser"]["config"], "zero_cond_t": True}
    with pytest.raises(NotImplementedError, match="zero_cond_t"):
        DreamBooth(components=components, sample_steps=2)
