"""Krea 2: conditions equal ``Krea2Pipeline.encode_prompt`` (the fixed-length block, the stacked layers, the mask) and
the transformer is called as the pipeline calls it; the training loss is the DreamBooth-LoRA script's on the same
batch, noise and timesteps (with ``model.flow_shift: 1.0``; the default trains at the pipeline's resolution-dependent
shift); the export (with the pipeline's settings) and the LoRA-only export sample the module's images in plain
diffusers and the export loads back in lightning-ft; guidance is the pipeline's g = w - 1; the modular pipelines are
refused by name; BNN, FSDP and A3FTA find their layers."""

from __future__ import annotations

import json

import family_checks as checks
import pytest
import torch
from conftest import REPO, perturb, tiny_components, tiny_module
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Krea2Pipeline
from diffusers.models.transformers.transformer_krea2 import Krea2TextFusionBlock, Krea2TransformerBlock
from diffusers.pipelines.krea2.pipeline_krea2 import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lightning_ft.core.families import detect_family, fsdp_block_classes
from lightning_ft.core.families.krea2 import Krea2
from lightning_ft.methods import AdapterAttentionFineTuning, BayesianFineTuning, DreamBooth

PROMPTS = ["a sks star on a gray background", "a red circle"]
TAPS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)  # Krea2Pipeline's default text_encoder_select_layers


def krea(**kwargs):
    return tiny_module(DreamBooth, "tiny_krea2", **kwargs)


def pipeline_call(pipe, prompts, seeds, guidance):
    """A plain ``Krea2Pipeline`` call at lightning-ft's guidance w (the pipeline's g = w - 1, default negative)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, guidance_scale=guidance - 1.0, num_inference_steps=2, height=32, width=32,
                max_sequence_length=16, generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="pt").images  # fmt: skip


def test_conditions_are_the_pipelines_encode_prompt():
    torch.manual_seed(0)
    module = krea().eval()
    family, pipe = module.family, module.build_pipeline()
    assert family.name == "krea2" and family.max_sequence_length == 16  # 512, capped by the tiny tokenizer
    assert family.layers == TAPS == pipe.text_encoder_select_layers and family.patch_size == 2
    # The 34 tokens dropped are the system turn and "<|im_start|>user\n"; the 5 appended are the assistant turn.
    assert len(module.tokenizer(pipe.prompt_template_encode_prefix).input_ids) == 34
    assert len(module.tokenizer(pipe.prompt_template_encode_suffix).input_ids) == 5
    prompts = [*PROMPTS, ""]
    embeds, mask = pipe.encode_prompt(prompts, max_sequence_length=16)
    cond = module.encode_prompts(prompts)
    states, own_mask = cond.fields["encoder_hidden_states"], cond.fields["encoder_attention_mask"]
    assert states.shape == embeds.shape == (3, 16, 12, 16) and mask.dtype == torch.bool
    torch.testing.assert_close(states, embeds, rtol=0, atol=0)
    assert torch.equal(own_mask.bool(), mask)
    # Prompt, padding, then the 5 suffix tokens after it: 7 words + 5, 3 + 5, 0 + 5 valid.
    assert mask.sum(1).tolist() == [12, 8, 5] and mask[:, -5:].all() and not mask[2, :-5].any()
    ids, ids_mask = family.tokenize(module.parts, [""])
    assert ids.shape == ids_mask.shape == (1, 34 + 16)
    assert not torch.allclose(states[0], states[1])


def test_the_transformer_is_called_as_the_pipeline_calls_it():
    torch.manual_seed(0)
    module = krea().eval()
    perturb(module)
    pipe = module.build_pipeline()
    cond = module.encode_prompts(PROMPTS)
    embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=16)
    x = torch.randn(2, 4, 8, 6)  # a non-square grid: rows and columns of the packing and the position ids
    t = torch.tensor([100, 800])
    packed = pipe._pack_latents(x, 2, 4, 8, 6)
    assert torch.equal(module.family.pack(x), packed)
    with torch.no_grad():
        got = module.predict(x, t, cond)
        sigma = module.noise_process.model_timesteps(t, x) / 1000
        position_ids = pipe.prepare_position_ids(16, 4, 3, x.device)
        out = module.denoiser(hidden_states=packed, encoder_hidden_states=embeds, timestep=sigma,
                              position_ids=position_ids, encoder_attention_mask=mask, return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(got, pipe._unpack_latents(out, 32, 24)[:, :, 0], rtol=0, atol=0)
    assert got.abs().mean() > 1e-3


def script_loss(module, batch, noise, u_seed, mu=None):
    """train_dreambooth_lora_krea2.py's loss on ``batch`` (instance + class images, prior preservation), step by step,
    with ``noise`` (B, C, H, W) and u drawn from a generator seeded ``u_seed``. ``mu``: the sigma table shifted by the
    pipeline's resolution-dependent shift (the scheduler's ``time_shift``) instead of the script's table."""
    vae, transformer = module.vae, module.denoiser
    # The script: FlowMatchEulerDiscreteScheduler.from_pretrained(..., subfolder="scheduler"), then a copy.
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_components("tiny_krea2")["scheduler"]["config"])
    pipe = Krea2Pipeline(scheduler=None, vae=None, transformer=None, text_encoder=module.text_encoder,
                         tokenizer=module.tokenizer)  # fmt: skip
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
    # compute_text_embeddings of each prompt, then concat_prompt_embedding_batches (one fixed length: a plain cat).
    pairs = [pipe.encode_prompt(prompt=p, max_sequence_length=16) for p in batch["prompts"] + batch["class_prompts"]]
    prompt_embeds = torch.cat([e for e, _ in pairs])
    prompt_embeds_mask = torch.cat([m for _, m in pairs])
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
    assert torch.allclose(sigmas.flatten(), 1 - indices / 1000)  # use_dynamic_shifting: the table is unshifted
    if mu is not None:
        sigmas = scheduler.time_shift(mu, 1.0, sigmas)
        timesteps = sigmas.flatten() * 1000
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    # The script's inlined _pack_latents (patch 2) of the (B, 1, C, H, W) permuted input.
    noisy_model_input = noisy_model_input.permute(0, 2, 1, 3, 4)
    c, h, w, p = model_input.shape[1], model_input.shape[3], model_input.shape[4], 2
    packed = noisy_model_input.view(bsz, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    packed = packed.reshape(bsz, (h // p) * (w // p), c * p * p)
    position_ids = Krea2Pipeline.prepare_position_ids(prompt_embeds.shape[1], h // 2, w // 2, "cpu")
    model_pred = transformer(hidden_states=packed, encoder_hidden_states=prompt_embeds, timestep=timesteps / 1000,
                             position_ids=position_ids, encoder_attention_mask=prompt_embeds_mask,
                             return_dict=False)[0]  # fmt: skip
    model_pred = model_pred.view(bsz, h // p, w // p, model_pred.shape[2] // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
    model_pred = model_pred.reshape(bsz, c, 1, h, w)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
    target = noise - model_input
    return checks.script_mse(model_pred, target, weighting, prior=True, chunk_weighting=True)


@pytest.mark.parametrize("flow_shift", [1.0, None])
def test_training_loss_is_the_scripts(flow_shift, monkeypatch):
    torch.manual_seed(0)
    module = krea(flow_shift=flow_shift, trainable="lora", lora_rank=2)
    perturb(module)
    checks.check_loss_at_both_shifts(module, script_loss, calculate_shift, flow_shift, monkeypatch, PROMPTS)


def test_export_samples_the_modules_images_in_plain_diffusers_and_loads_back(tmp_path):
    torch.manual_seed(0)
    module = krea()
    perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0)
    module.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_encoder_select_layers"] == list(TAPS) and index["patch_size"] == 2
    assert index["is_distilled"] is False
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe).__name__ == "Krea2Pipeline" and type(pipe.vae).__name__ == "AutoencoderKLQwenImage"
    torch.testing.assert_close(pipeline_call(pipe, PROMPTS, [0, 1], 2.0).float(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1])
    # The folder loads back in lightning-ft: its list-valued setting is a setting, not a component.
    generate = {"prompts": PROMPTS, "seeds": [0, 1], "guidance_scale": 2.0}
    assert checks.check_loads_back(tmp_path, "krea2", expected, generate, sample_resolution=32).family.layers == TAPS


def test_the_pipelines_settings_are_read_from_the_folder_and_kept_in_the_export(tmp_path):
    torch.manual_seed(0)
    krea().save_pretrained(tmp_path / "base")
    index_file = tmp_path / "base" / "model_index.json"
    index = json.loads(index_file.read_text())
    taps = [1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 36]
    index_file.write_text(json.dumps({**index, "text_encoder_select_layers": taps, "is_distilled": True}))
    module = DreamBooth(pretrained=str(tmp_path / "base"), sample_steps=2, sample_resolution=32)
    assert module.family.layers == tuple(taps) and module.family.is_distilled
    embeds, _ = module.build_pipeline().encode_prompt(PROMPTS, max_sequence_length=16)
    torch.testing.assert_close(module.encode_prompts(PROMPTS).fields["encoder_hidden_states"], embeds, rtol=0, atol=0)
    module.save_pretrained(tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert saved["text_encoder_select_layers"] == taps and saved["is_distilled"] is True
    # Taps the text encoder does not have, or not as many as the transformer stacks, are refused naming them.
    index_file.write_text(json.dumps({**index, "text_encoder_select_layers": [2, 5, 40]}))
    with pytest.raises(ValueError, match="stacks hidden states"):
        DreamBooth(pretrained=str(tmp_path / "base"), sample_steps=2)


def test_lora_only_export_loads_with_load_lora_weights(tmp_path):
    torch.manual_seed(0)
    module = krea(trainable="lora", lora_rank=2, lora_alpha=4)
    perturb(module)
    sample = lambda pipe: pipeline_call(pipe, PROMPTS, [0, 1], 2.0)
    checks.check_lora_only_export(module, tmp_path, krea, PROMPTS, sample=sample, differs=1e-4)
    # The script's default targets (the Krea 2 authors' set), on the blocks and outside them.
    assert checks.lora_targets(module) == set(Krea2.lora_targets)
    lora = {n.removesuffix(".lora_A.default.weight") for n, _ in module.denoiser.named_parameters() if "lora_A" in n}
    assert {"img_in", "final_layer.linear", "time_mod_proj", "text_fusion.projector", "txt_in.linear_1",
            "time_embed.linear_2", "transformer_blocks.1.attn.to_gate", "transformer_blocks.0.ff.down",
            "text_fusion.refiner_blocks.0.attn.to_q"} <= lora  # fmt: skip


def test_guidance_is_the_pipelines_g_with_the_empty_negative_prompt(monkeypatch):
    torch.manual_seed(0)
    module = krea()
    perturb(module)
    calls = checks.record_calls(monkeypatch, Krea2Pipeline)
    guided = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=3.0)
    plain = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=1.0)
    assert calls[0]["guidance_scale"] == 2.0 and calls[1]["guidance_scale"] == 0.0  # w - 1: 0 is unguided
    assert calls[0]["negative_prompt"] is None  # the pipeline's default "" (the null input)
    assert calls[0]["max_sequence_length"] == 16 and calls[0]["height"] == calls[0]["width"] == 32
    assert not torch.allclose(guided, plain, atol=1e-4)
    # The model card's example calls the pipeline with its own g as well.
    usage = module.family.usage_example("a sks star", "num_inference_steps=28, guidance_scale=5.5")
    assert usage == "image = pipe('a sks star', num_inference_steps=28, guidance_scale=4.5).images[0]"


@pytest.mark.parametrize("variant", ["Krea2ModularPipeline", "Krea2TurboModularPipeline"])
def test_variant_pipelines_are_refused_by_name(variant, tmp_path):
    torch.manual_seed(0)
    module = krea()
    assert detect_family(module.parts) == "krea2"
    module.save_pretrained(tmp_path)
    assert variant in Krea2.refused
    checks.check_refused_by_name(tmp_path, variant, sample_steps=2)


def test_bnn_fsdp_and_a3fta_find_their_layers():
    torch.manual_seed(0)
    names = tiny_module(BayesianFineTuning, "tiny_krea2").bayesian_names
    parts = {n.split(".", 2)[2] for n in names}
    assert {n.split(".")[0] for n in names} == {"transformer_blocks"}
    assert parts == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_gate", "attn.to_out.0", "ff.gate", "ff.up",
                     "ff.down"}  # fmt: skip
    assert {Krea2TransformerBlock, Krea2TextFusionBlock} <= fsdp_block_classes()
    module = tiny_module(AdapterAttentionFineTuning, "tiny_krea2")
    adapted = sorted(n for n, m in module.denoiser.named_modules() if type(m).__name__ == "AdaptedProjection")
    # The blocks' attention only: the text fusion's attention (over tapped layers, per token) has no timestep.
    assert adapted == ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.attn.to_out.0"]
    assert module.family.time_embedding == "time_embed"
    with torch.no_grad():
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
        module.predict(x, t, module.encode_prompts(PROMPTS))  # the tap reads the (B, 1, D) time embedding
    assert (REPO / "configs/model/tiny_krea2.yaml").is_file()
