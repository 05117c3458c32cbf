"""Lumina 2: conditions equal ``Lumina2Pipeline.encode_prompt`` (system prompt on the prompts, not on the negative
branch, ``hidden_states[-2]`` with the mask), the transformer is called as the pipeline calls it (1 - sigma, negated
output) and reads only the valid tokens, the training loss equals diffusers' DreamBooth-LoRA script's on the same
batch, noise and noise levels (its reversed lerp reads the table backwards: ``flow_shift`` 1/S reproduces it; the
default trains where the pipeline samples), the full and LoRA-only exports sample the module's images in plain
diffusers, Lumina-Next is refused by name, and BNN / FSDP / A3FTA find their layers."""

from __future__ import annotations

import copy
import json

import family_checks as checks
import pytest
import torch
from conftest import REPO, perturb, tiny_backbones, tiny_components, tiny_module
from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline
from diffusers.models.transformers.transformer_lumina2 import Lumina2TransformerBlock
from diffusers.training_utils import compute_loss_weighting_for_sd3

from lightning_ft.core.families import fsdp_block_classes
from lightning_ft.methods import DreamBooth

PROMPTS = ["a sks star on a gray background", "a red circle"]
CLASS_PROMPTS = ["a star on a gray background", "a blue square"]
SHIFT = 3.0  # the tiny scheduler's fixed shift
LATENT = (4, 4, 4)  # model-space latents of a 32 px image


def lumina(**kwargs):
    return tiny_module(DreamBooth, "tiny_lumina2", **kwargs)


def test_conditions_are_the_pipelines_encode_prompt():
    torch.manual_seed(0)
    module = lumina().eval()
    family = module.family
    assert family.name == "lumina2" and family.max_sequence_length == 48  # the pipeline's 256, capped
    pipe = module.build_pipeline()
    assert isinstance(pipe, Lumina2Pipeline)
    assert family.system_prompt == pipe.system_prompt
    embeds, mask, negative, negative_mask = pipe.encode_prompt(list(PROMPTS), max_sequence_length=48)
    cond = module.encode_prompts([*PROMPTS, ""])
    states, own_mask = cond.fields["encoder_hidden_states"], cond.fields["encoder_attention_mask"]
    torch.testing.assert_close(states, torch.cat([embeds, negative[:1]]), rtol=0, atol=1e-6)
    assert torch.equal(own_mask, torch.cat([mask, negative_mask[:1]]))
    assert own_mask.sum(1).tolist() == [39, 35, 2]  # system prompt + " <Prompt Start> " + prompt; "" alone
    # The system prompt is on the prompts and not on the empty prompt, the pipeline's negative branch.
    ids, ids_mask = family.tokenize(module.parts, ["a red circle", ""])
    tokens = module.tokenizer.convert_ids_to_tokens(ids[0][ids_mask[0].bool()])
    assert tokens[:4] == ["<bos>", "you", "are", "an"]
    assert tokens[-8:] == ["<", "prompt", "start", ">", "a", "red", "circle", "<eos>"]
    assert module.tokenizer.convert_ids_to_tokens(ids[1][ids_mask[1].bool()]) == ["<bos>", "<eos>"]
    # The null condition is the pipeline's negative branch.
    torch.testing.assert_close(module.null_condition(1).fields["encoder_hidden_states"], negative[:1], rtol=0,
                               atol=1e-6)  # fmt: skip
    # A plain call's default 256 tokens pads further and changes no valid state (causal encoder, right padding).
    long, long_mask, _, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
    assert long.shape[1] == 256 and torch.equal(long_mask[:, :48], mask) and not long_mask[:, 48:].any()
    torch.testing.assert_close(long[:, :48][mask.bool()], embeds[mask.bool()], rtol=0, atol=1e-6)
    assert not torch.allclose(states[0], states[1])


def test_the_transformer_is_called_as_the_pipeline_calls_it():
    """One pipeline step (no guidance) captured at the transformer: the family's call on the same latents at 1000
    sigma gives the negated output; other states on the padding, or the pipeline's 256-token padding, change
    nothing."""
    torch.manual_seed(0)
    module = lumina().eval()
    perturb(module)
    pipe = module.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with checks.last_denoiser_call(module) as seen:
        pipe(list(PROMPTS), guidance_scale=1.0, num_inference_steps=2, output_type="latent",
             generator=torch.Generator().manual_seed(0), **module.family.pipeline_call_kwargs(module))  # fmt: skip
    assert seen["hidden_states"].shape == (2, 4, 4, 4)  # 32 px / 8
    cond = module.encode_prompts(PROMPTS)
    torch.testing.assert_close(seen["encoder_hidden_states"], cond.fields["encoder_hidden_states"], rtol=0, atol=1e-6)
    sigma = 1 - seen["timestep"]  # the pipeline's 1 - t / 1000 at the last step
    assert 0 < sigma[0] < 1
    latents = seen["hidden_states"]
    with torch.no_grad():
        got = module.family.denoise(module.denoiser, latents, 1000 * sigma, cond)
        torch.testing.assert_close(got, -seen["out"], rtol=0, atol=1e-5)
        padded = ~cond.fields["encoder_attention_mask"].bool()
        states = cond.fields["encoder_hidden_states"]
        other = cond.replace(encoder_hidden_states=torch.where(padded[..., None], torch.randn_like(states), states))
        torch.testing.assert_close(module.family.denoise(module.denoiser, latents, 1000 * sigma, other), got,
                                   rtol=0, atol=1e-6)  # fmt: skip
        long, long_mask, _, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
        plain = cond.replace(encoder_hidden_states=long, encoder_attention_mask=long_mask)
        torch.testing.assert_close(module.family.denoise(module.denoiser, latents, 1000 * sigma, plain), got,
                                   rtol=0, atol=1e-5)  # fmt: skip


def script_loss(pipe, scheduler, pixels, prompts, noise, u, prior=False, mirrored=False):
    """diffusers' train_dreambooth_lora_lumina2.py, one step on given noise and u (its density draw; the posterior
    draw from the global generator, seeded by the caller), with prior preservation (the batch's second half: class
    images) when ``prior``. ``mirrored``: the table read as the pipeline samples it (noise level = the table's sigma,
    the transformer given 1 - sigma) instead of the script's reversed lerp."""
    vae, transformer = pipe.vae, pipe.transformer
    model_input = vae.encode(pixels).latent_dist.sample()
    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
    timesteps, sigmas = checks.script_draw(scheduler, u)
    if mirrored:
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        timesteps = 1000 - timesteps
    else:
        noisy_model_input = (1.0 - sigmas) * noise + sigmas * model_input  # "Lumina2 reverses the lerp"
    timesteps = timesteps / scheduler.config.num_train_timesteps
    prompt_embeds, prompt_attention_mask, _, _ = pipe.encode_prompt(list(prompts), max_sequence_length=48)
    model_pred = transformer(hidden_states=noisy_model_input, encoder_hidden_states=prompt_embeds,
                             encoder_attention_mask=prompt_attention_mask, timestep=timesteps,
                             return_dict=False)[0]  # fmt: skip
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
    target = model_input - noise  # "flow matching loss (reversed)"
    # The script chunks the predictions and targets but not ``weighting`` (ones here): with one image per half it
    # broadcasts to a copy of the same values.
    return checks.script_mse(model_pred, target, weighting, prior, chunk_weighting=False)


@pytest.mark.parametrize("prior", [False, True])
def test_the_training_loss_is_the_scripts_with_flow_shift_one_over_the_schedulers(prior):
    """The script's noise level at table index i is 1 - shift_S(u_i) = shift_{1/S}(i / 1000): lightning-ft's
    t = i - 1 under ``flow_shift: 1/S`` is that very level, and the loss is the script's."""
    torch.manual_seed(0)
    module = lumina(flow_shift=1 / SHIFT)
    perturb(module)
    batch, pixels, prompts, noise, u = checks.dreambooth_batch(PROMPTS, CLASS_PROMPTS, LATENT, prior)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_components("tiny_lumina2")["scheduler"]["config"])
    index = (u * 1000).long()
    t = index - 1
    torch.testing.assert_close(module.noise_process.sigmas(t), 1 - scheduler.sigmas[index], rtol=0, atol=1e-6)
    torch.manual_seed(1234)
    with torch.no_grad():
        expected = script_loss(module.build_pipeline(), scheduler, pixels, prompts, noise, u, prior)
    got = checks.fixed_draws_loss(module, batch, t, noise, seed=1234)
    print(f"prior={prior}: script {expected.item():.8f} lightning-ft {got.item():.8f}")
    assert abs(got.item() - expected.item()) <= 1e-6


def test_the_default_trains_where_the_pipeline_samples():
    """Default (the scheduler's shift S): the noise levels are the table's sigmas, which the pipeline steps through
    (its own draw: t = 999 - i), and the loss is the script's computation with the table read that way; the script's
    own reading gives another loss."""
    torch.manual_seed(0)
    module = lumina()
    perturb(module)
    batch, pixels, prompts, noise, u = checks.dreambooth_batch(PROMPTS, CLASS_PROMPTS, LATENT, False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_components("tiny_lumina2")["scheduler"]["config"])
    index = (u * 1000).long()
    t = 999 - index
    draw = module.noise_process.sample_timesteps(4, generator=torch.Generator().manual_seed(3))
    u_draw = torch.rand(4, generator=torch.Generator().manual_seed(3))  # compute_density's "none": torch.rand
    assert torch.equal(draw, 999 - (u_draw * 1000).long())
    torch.testing.assert_close(module.noise_process.sigmas(t), scheduler.sigmas[index], rtol=0, atol=1e-6)
    torch.manual_seed(1234)
    with torch.no_grad():
        mirrored = script_loss(module.build_pipeline(), scheduler, pixels, prompts, noise, u, mirrored=True)
        torch.manual_seed(1234)
        script = script_loss(module.build_pipeline(), scheduler, pixels, prompts, noise, u)
    got = checks.fixed_draws_loss(module, batch, t, noise, seed=1234)
    print(f"default: pipeline's reading {mirrored.item():.8f} script {script.item():.8f} lightning-ft {got.item():.8f}")
    assert abs(got.item() - mirrored.item()) <= 1e-6 and abs(got.item() - script.item()) > 1e-3


def test_the_export_samples_the_modules_images_in_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    module = lumina()
    perturb(module)
    expected, pipe = checks.export_and_load(module, tmp_path / "export", "Lumina2Pipeline", PROMPTS)
    # A plain call (its own 256 tokens, system prompt and normalised guidance) samples the same images.
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    plain = pipe(list(PROMPTS), num_inference_steps=2, guidance_scale=2.5, generator=generators,
                 output_type="pt").images  # fmt: skip
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-5)
    # Guidance 1 is the conditional branch alone.
    unguided = module.generate(prompts=PROMPTS, seeds=[3, 4], guidance_scale=1.0)
    assert not torch.allclose(unguided, expected, atol=1e-3)
    # lightning-ft loads the export back as a Lumina 2 model.
    generate = {"prompts": PROMPTS, "seeds": [3, 4], "guidance_scale": 2.5}
    assert checks.check_loads_back(tmp_path / "export", "lumina2", expected, generate).family.max_sequence_length == 48


def test_another_system_prompt_is_trained_recorded_and_read_back(tmp_path):
    torch.manual_seed(0)
    module = lumina()
    family = module.family
    family.system_prompt = "You are an assistant"
    ids, mask = family.tokenize(module.parts, ["a red circle"])
    assert module.tokenizer.convert_ids_to_tokens(ids[0][mask[0].bool()])[:6] == ["<bos>", "you", "are", "an",
                                                                                 "assistant", "<"]  # fmt: skip
    module.save_pretrained(tmp_path / "export")
    record = json.loads((tmp_path / "export" / "lightning_ft.json").read_text())
    assert record["pipeline_call"] == {"system_prompt": "You are an assistant"}
    reloaded = DreamBooth(pretrained=str(tmp_path / "export"), sample_steps=2)
    assert reloaded.family.system_prompt == "You are an assistant"
    assert reloaded.family.pipeline_call_kwargs(reloaded)["system_prompt"] == "You are an assistant"


def test_lora_only_export_loads_with_load_lora_weights(tmp_path):
    torch.manual_seed(0)
    module = lumina(trainable="lora", lora_rank=2, lora_alpha=4)
    perturb(module)
    assert checks.lora_targets(module) == {"to_k", "to_q", "to_v", "to_out.0"}  # the script's default
    lora = {n.split(".")[0] for n, _ in module.denoiser.named_parameters() if "lora" in n}
    assert lora == {"layers", "noise_refiner", "context_refiner"}
    checks.check_lora_only_export(module, tmp_path, lumina, PROMPTS)


def test_lumina_next_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    lumina().save_pretrained(tmp_path / "folder")
    checks.check_refused_by_name(tmp_path / "folder", "LuminaPipeline")


def test_a_vae_of_another_compression_is_refused():
    components = copy.deepcopy(tiny_components("tiny_lumina2"))
    vae = components["vae"]["config"]
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        vae[key] = vae[key][:2]
    with pytest.raises(ValueError, match="compresses 2x"):
        DreamBooth(components=components, backbones=tiny_backbones("tiny_lumina2"))


def test_bnn_fsdp_and_a3fta_find_their_layers():
    torch.manual_seed(0)
    module = lumina()
    family = module.family
    chosen = checks.bnn_chosen(module)
    assert {n.split(".")[0] for n in chosen} == {"layers", "noise_refiner"}
    assert not any("norm1" in n for n in chosen) and any(n.endswith("attn.to_q") for n in chosen)
    assert any(n.endswith("feed_forward.linear_2") for n in chosen)
    assert Lumina2TransformerBlock in fsdp_block_classes()  # 2 layers + the two refiners' blocks here
    assert sum(isinstance(m, Lumina2TransformerBlock) for m in module.denoiser.modules()) == 2 + 1 + 1
    assert set(family.attention_names) <= checks.leaf_names(module)
    embedder = module.denoiser.get_submodule(family.time_embedding)
    assert type(embedder).__name__ == "TimestepEmbedding"
    assert (REPO / "configs/model/tiny_lumina2.yaml").is_file()
