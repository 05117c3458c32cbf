"""Sana: conditions equal ``SanaPipeline.encode_prompt`` (states and mask, with the pipeline's complex human
instruction and its ``select_index``), the null condition is the pipeline's negative branch, the transformer is
called as the pipeline calls it, training uses the Euler flow of the scheduler's shift while sampling and the export
keep its DPM-Solver, the export samples the same images in plain diffusers, the LoRA-only export loads with the
pipeline's ``load_lora_weights``, and the family is recognised from a folder and from its components."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb, tiny_components, tiny_module
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
)

from lightning_ft.core import DiffusionBase
from lightning_ft.core.families import Sana, detect_family
from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.core.families.sana import pipeline_complex_human_instruction
from lightning_ft.methods import DreamBooth

PROMPTS = ["  A SKS Star on a gray background ", "a red circle"]
PLAIN = ["a sks star on a gray background", "a red circle"]


def sana(**kwargs):
    return tiny_module(DreamBooth, "tiny_sana", **kwargs)


def test_conditions_are_the_pipelines_encode_prompt_with_its_instruction():
    torch.manual_seed(0)
    module = sana().eval()
    family = module.family
    assert family.name == "sana" and family.max_sequence_length == 12  # the pipeline's 300, capped by the tokenizer
    # What a plain pipeline call prepends (encode_prompt's own default is None: training must pass it).
    chi = pipeline_complex_human_instruction()
    assert family.complex_human_instruction == chi and len(chi) == 8 and chi[-1] == "User Prompt: "
    pipe = module.build_pipeline()
    assert isinstance(pipe, SanaPipeline)
    embeds, mask, _, _ = pipe.encode_prompt(
        PROMPTS, do_classifier_free_guidance=False, max_sequence_length=12, complex_human_instruction=chi
    )
    cond = module.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond.fields["encoder_hidden_states"], embeds, rtol=0, atol=0)
    assert cond.fields["encoder_attention_mask"].dtype == mask.dtype == torch.long
    assert torch.equal(cond.fields["encoder_attention_mask"], mask)
    # select_index keeps <bos> and the last 11 positions: exactly the prompt's <bos> + 7 words + <eos>, then padding.
    assert mask[0].tolist() == [1] * 9 + [0] * 3
    ids, _, null = family.tokenize(module.parts, PLAIN)
    plain = module.tokenizer(PLAIN, padding="max_length", max_length=12, return_tensors="pt").input_ids
    assert torch.equal(ids[:, family.select_index(ids.shape[1])], plain) and not null.any()
    assert ids.shape[1] > 100  # the encoder read the whole instruction (its words are <unk> to the tiny tokenizer)
    # The instruction changes the states (the causal encoder reads it), not the mask.
    without, mask_without, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=12)
    assert torch.equal(mask_without, mask) and not torch.allclose(without, embeds, atol=1e-3)
    # Lower-cased and stripped as the pipeline's text preprocessing.
    again = module.encode_prompts(PLAIN)
    assert torch.equal(again.fields["encoder_hidden_states"], cond.fields["encoder_hidden_states"])
    # Without an instruction (diffusers' DreamBooth script default): encode_prompt's default.
    family.complex_human_instruction = None
    off = module.encode_prompts(PROMPTS)
    torch.testing.assert_close(off.fields["encoder_hidden_states"], without, rtol=0, atol=0)
    assert module.family.pipeline_call_kwargs(module)["complex_human_instruction"] is None


def test_the_null_condition_is_the_pipelines_negative_branch():
    torch.manual_seed(0)
    module = sana(condition_dropout=1.0)
    pipe = module.build_pipeline()
    chi = module.family.complex_human_instruction
    embeds, _, negative, negative_mask = pipe.encode_prompt(
        PROMPTS, negative_prompt="", max_sequence_length=12, complex_human_instruction=chi
    )
    null = module.null_condition(2)
    torch.testing.assert_close(null.fields["encoder_hidden_states"], negative, rtol=0, atol=0)
    assert torch.equal(null.fields["encoder_attention_mask"], negative_mask)
    assert negative_mask[0].tolist() == [1, 1] + [0] * 10  # <bos> <eos>, encoded (not zeros)
    assert null.fields["encoder_hidden_states"].abs().sum() > 0
    # Without the instruction: not the empty prompt as a prompt is encoded (instruction prepended, then selected).
    as_prompt, _, _, _ = pipe.encode_prompt(
        [""], do_classifier_free_guidance=False, max_sequence_length=12, complex_human_instruction=chi
    )
    assert not torch.allclose(as_prompt[0], negative[0], atol=1e-3)
    # A batch of a prompt and the empty prompt: each row its own branch.
    mixed = module.eval().encode_prompts([PROMPTS[0], ""])
    torch.testing.assert_close(mixed.fields["encoder_hidden_states"][0], embeds[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed.fields["encoder_hidden_states"][1], negative[1], rtol=0, atol=0)
    # Condition dropout trains exactly that branch.
    module.train()
    dropped = module.encode_conditions({"pixel_values": torch.zeros(2, 3, 32, 32), "prompts": PROMPTS})
    assert torch.equal(dropped.fields["encoder_hidden_states"], null.fields["encoder_hidden_states"])
    assert torch.equal(dropped.fields["encoder_attention_mask"], null.fields["encoder_attention_mask"])


def test_the_denoiser_is_called_as_the_pipeline_calls_it(monkeypatch):
    """One pipeline step (no guidance) captured at the transformer: the family's call on the same latents, timestep
    and prompts gives its output, with a ``timestep_scale`` other than 1 too; in training the transformer is given
    1000 sigma of the shifted Euler flow, as diffusers' Sana DreamBooth script gives it."""
    torch.manual_seed(0)
    module = sana().eval()
    perturb(module)
    module.denoiser.register_to_config(timestep_scale=0.5)
    pipe = module.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def keep(layer, args, kwargs, output):
        seen.update(x=args[0], t=kwargs["timestep"], out=output[0], mask=kwargs["encoder_attention_mask"])

    hook = module.denoiser.register_forward_hook(keep, with_kwargs=True)
    pipe(PROMPTS, guidance_scale=1.0, num_inference_steps=1, output_type="latent",
         generator=torch.Generator().manual_seed(0), **module.family.pipeline_call_kwargs(module))  # fmt: skip
    hook.remove()
    assert seen["t"].tolist() == [999 * 0.5] * 2  # DPM-Solver's int(1000 sigma), times timestep_scale
    cond = module.encode_prompts(PROMPTS)
    assert torch.equal(seen["mask"], cond.fields["encoder_attention_mask"])
    with torch.no_grad():
        got = module.family.denoise(module.denoiser, seen["x"], seen["t"] / 0.5, cond)
        torch.testing.assert_close(got, seen["out"], rtol=0, atol=1e-6)
        # The padded tokens are masked: other states there change nothing.
        padded = cond.fields["encoder_attention_mask"] == 0
        states = cond.fields["encoder_hidden_states"]
        noisy_pad = torch.where(padded[..., None], torch.randn_like(states), states)
        other = module.family.denoise(
            module.denoiser, seen["x"], seen["t"] / 0.5, cond.replace(encoder_hidden_states=noisy_pad)
        )
        torch.testing.assert_close(other, got, rtol=0, atol=1e-5)
    # Training: the process's timesteps become 1000 sigma (shift 3), times the scale.
    calls = {}
    forward = module.denoiser.forward

    def spy(*args, **kwargs):
        calls.update(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(module.denoiser, "forward", spy)
    t = torch.tensor([0, 499])
    with torch.no_grad():
        module.predict(torch.randn(2, 4, 8, 8), t, cond)
    u = (t.float() + 1) / 1000
    torch.testing.assert_close(calls["timestep"], 1000 * 3 * u / (1 + 2 * u) * 0.5)


def test_training_uses_the_euler_flow_of_the_same_shift_and_the_export_keeps_the_dpm_solver(tmp_path):
    torch.manual_seed(0)
    module = sana()
    process = module.noise_process
    assert process.kind == "flow_matching" and process.density == "uniform"  # the script's weighting_scheme none
    assert isinstance(process.scheduler, FlowMatchEulerDiscreteScheduler) and process.scheduler.config.shift == 3.0
    sampler = module.sampling_scheduler()
    assert isinstance(sampler, DPMSolverMultistepScheduler)
    assert sampler.config.use_flow_sigmas and sampler.config.flow_shift == 3.0
    assert sampler.config.prediction_type == "flow_prediction"
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([249, 749])
    u = (t.float() + 1) / 1000
    sigma = (3 * u / (1 + 2 * u)).view(-1, 1, 1, 1)
    torch.testing.assert_close(process.add_noise(x0, eps, t), (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(process.target(x0, eps, t), eps - x0)
    # The pipeline samples with the DPM-Solver, and the export keeps it.
    assert isinstance(module.build_pipeline().scheduler, DPMSolverMultistepScheduler)
    module.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DPMSolverMultistepScheduler"
    assert config["use_flow_sigmas"] and config["flow_shift"] == 3.0


def test_the_dc_autoencoder_encodes_deterministically_and_the_pipeline_decodes_it():
    torch.manual_seed(0)
    module = sana().eval()
    assert module.vae_scale_factor() == 4 and module.native_resolution() == 32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = module.encode_images(x)
        torch.testing.assert_close(latents, module.vae.encode(x).latent * 0.41407)
        assert torch.equal(module.encode_images(x), latents)  # no posterior to sample
        pipe = module.build_pipeline()
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        torch.testing.assert_close(decoded, module.vae.decode(module.vae.encode(x).latent).sample)
    assert latents.shape == (2, 4, 8, 8)
    # Sides: multiples of 32 (SanaPipeline.check_inputs).
    assert module.family.resolution_multiple(module.parts) == 32
    module.check_resolution(64)
    with pytest.raises(ValueError, match="data.resolution=48 is not a multiple of 32"):
        module.check_resolution(48)


def test_the_export_reloads_in_plain_diffusers_with_the_same_images(tmp_path):
    torch.manual_seed(0)
    module = sana()
    perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[3, 4], guidance_scale=2.0)
    assert not torch.allclose(expected[0], expected[1])
    module.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "SanaPipeline"
    assert index["transformer"] == ["diffusers", "SanaTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderDC"]
    assert index["text_encoder"] == ["transformers", "Gemma2Model"]
    assert "pipeline_call" not in json.loads((tmp_path / "lightning_ft.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe, SanaPipeline)
    pipe.set_progress_bar_config(disable=True)
    # The pipeline's own defaults (300 tokens, its complex human instruction): only the tiny size and binning
    # (the tiny sample size is outside its tables) are given.
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    got = pipe(PROMPTS, guidance_scale=2.0, num_inference_steps=2, generator=generators, output_type="pt",
               height=32, width=32, use_resolution_binning=False).images  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # The folder is recognised from its model_index, and the module loaded from it samples the same images.
    reloaded = DiffusionBase(pretrained=str(tmp_path), sample_steps=2)
    assert reloaded.family.name == "sana" and reloaded.parts.pipeline_class == "SanaPipeline"
    again = reloaded.generate(prompts=PROMPTS, seeds=[3, 4], guidance_scale=2.0)
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-5)


def test_an_export_trained_without_the_instruction_records_it(tmp_path):
    torch.manual_seed(0)
    module = sana()
    perturb(module)
    module.family.complex_human_instruction = None
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0)
    module.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "lightning_ft.json").read_text())
    assert record["pipeline_call"] == {"complex_human_instruction": None}
    reloaded = DiffusionBase(pretrained=str(tmp_path), sample_steps=2)
    assert reloaded.family.complex_human_instruction is None
    torch.testing.assert_close(reloaded.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0), expected)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    call = dict(height=32, width=32, use_resolution_binning=False, output_type="pt", num_inference_steps=2)
    plain = pipe(PROMPTS, guidance_scale=2.0, generator=generators, complex_human_instruction=None, **call).images
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-5)


def test_lora_only_export_loads_with_load_lora_weights(tmp_path):
    torch.manual_seed(0)
    module = sana(trainable="lora", lora_rank=2, lora_alpha=4)
    config = next(iter(module.denoiser.peft_config.values()))
    assert set(config.target_modules) == {"to_q", "to_k", "to_v"}  # diffusers' Sana DreamBooth-LoRA default
    layers = {n.rsplit(".lora_A", 1)[0] for n, _ in module.denoiser.named_parameters() if ".lora_A" in n}
    assert {"transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_v"} <= layers
    assert not any("to_out" in n for n in layers)
    perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0)
    module.save_pretrained(tmp_path / "lora", lora_only=True)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    torch.manual_seed(0)
    sana().save_pretrained(tmp_path / "base")  # the same random base the LoRA started from
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    base_images = module.family.sample(module, pipe, SampleInputs.of(prompts=PROMPTS), [0, 1], 2, 2.0)
    pipe.load_lora_weights(tmp_path / "lora")
    got = module.family.sample(module, pipe, SampleInputs.of(prompts=PROMPTS), [0, 1], 2, 2.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert not torch.allclose(base_images, expected, atol=1e-3)  # the LoRA is what makes the difference
    # The family's own loader puts it back on a plain transformer (alpha from the saved metadata).
    transformer = type(module.denoiser).from_pretrained(tmp_path / "base", subfolder="transformer")
    module.family.load_lora(transformer, tmp_path / "lora")
    assert next(iter(transformer.peft_config.values())).lora_alpha == 4


def test_the_family_is_detected_and_sana_sprint_is_refused(tmp_path):
    assert "SanaPipeline" not in Sana.refused and "SanaSprintPipeline" in Sana.refused
    torch.manual_seed(0)
    module = sana()
    assert detect_family(module.parts) == "sana"  # from the components (no model_index)
    components = tiny_components("tiny_sana")
    sprint = {**components["denoiser"], "config": {**components["denoiser"]["config"], "guidance_embeds": True}}
    with pytest.raises(ValueError, match="guidance_embeds"):
        DiffusionBase(components={**components, "denoiser": sprint}, sample_steps=2)
    with pytest.raises(ValueError, match="text encoder"):
        DiffusionBase(components={**components, "text_encoder": None, "tokenizer": None}, sample_steps=2)
