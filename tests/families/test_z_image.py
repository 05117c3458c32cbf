"""Z-Image: conditions equal ``ZImagePipeline.encode_prompt`` (chat template, ``hidden_states[-2]``, per-sample token
lists), the transformer is called as the pipeline calls it (list input with a frame axis, 1 - sigma, negated output),
the training loss equals diffusers' DreamBooth-LoRA script's on the same batch, noise and timesteps (its shift, and
the pipeline's where a dynamic scheduler makes them differ), the full and LoRA-only exports sample the module's images
in plain diffusers, and the pipeline's image-conditioned variants are refused by name."""

from __future__ import annotations

import copy

import family_checks as checks
import pytest
import torch
from conftest import REPO, perturb, tiny_backbones, tiny_components, tiny_module
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift
from diffusers.training_utils import compute_loss_weighting_for_sd3

from lightning_ft.core.families import fsdp_block_classes
from lightning_ft.methods import DreamBooth

PROMPTS = ["a sks star on a gray background", "a red circle"]
CLASS_PROMPTS = ["a star on a gray background", "a blue square"]
LATENT = (4, 16, 16)  # model-space latents of a 32 px image


def z_image(**kwargs):
    return tiny_module(DreamBooth, "tiny_z_image", **kwargs)


def valid(cond) -> list[torch.Tensor]:
    """Each sample's states on its valid tokens (what the pipeline's per-sample list holds)."""
    mask = cond.fields["encoder_attention_mask"].bool()
    return [s[m] for s, m in zip(cond.fields["encoder_hidden_states"], mask)]


def test_conditions_are_the_pipelines_encode_prompt():
    torch.manual_seed(0)
    module = z_image().eval()
    family = module.family
    assert family.name == "z_image" and family.max_sequence_length == 24  # the pipeline's 512, capped by the tokenizer
    pipe = module.build_pipeline()
    assert isinstance(pipe, ZImagePipeline)
    embeds, negative = pipe.encode_prompt(list(PROMPTS), max_sequence_length=24)  # the negative branch: ""
    cond = module.encode_prompts([*PROMPTS, ""])
    got = valid(cond)
    assert [len(g) for g in got] == [len(e) for e in [*embeds, negative[0]]] == [14, 10, 7]
    for mine, theirs in zip(got, [*embeds, negative[0]]):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    # The chat template wraps every prompt (the empty one too): <bos> <|im_start|> user ... <|im_end|> <|im_start|>
    # assistant <eos>, and nothing past the prompt is kept.
    ids, mask = family.tokenize(module.parts, [""])
    tokens = module.tokenizer.convert_ids_to_tokens(ids[0][mask[0].bool()])
    assert tokens == ["<bos>", "<|im_start|>", "user", "<|im_end|>", "<|im_start|>", "assistant", "<eos>"]
    assert cond.fields["encoder_hidden_states"][~cond.fields["encoder_attention_mask"].bool()].abs().sum() == 0
    # The null condition is the pipeline's negative branch.
    torch.testing.assert_close(valid(module.null_condition(1))[0], negative[0], rtol=0, atol=1e-6)
    # A plain call's default 512 tokens pads further and changes no valid state (causal encoder, right padding).
    long, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
    for mine, theirs in zip(got, long):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_the_transformer_is_called_as_the_pipeline_calls_it():
    """One pipeline step (no guidance) captured at the transformer: the family's call on the same latents and 1000
    sigma gives the negated output; other states on the padding change nothing."""
    torch.manual_seed(0)
    module = z_image().eval()
    perturb(module)
    pipe = module.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def keep(layer, args, kwargs, output):
        seen.update(x=args[0], t=args[1], captions=args[2], out=output[0])

    hook = module.denoiser.register_forward_hook(keep, with_kwargs=True)
    pipe(list(PROMPTS), guidance_scale=0.0, num_inference_steps=2, output_type="latent",
         generator=torch.Generator().manual_seed(0), **module.family.pipeline_call_kwargs(module))  # fmt: skip
    hook.remove()
    assert isinstance(seen["x"], list) and seen["x"][0].shape == (4, 1, 16, 16)  # (C, frame, H, W) per sample
    cond = module.encode_prompts(PROMPTS)
    assert [len(c) for c in seen["captions"]] == cond.fields["encoder_attention_mask"].sum(1).tolist() == [14, 10]
    latents = torch.stack(seen["x"]).squeeze(2)
    sigma = 1 - seen["t"]  # the pipeline's (1000 - t) / 1000 at the last step
    assert 0 < sigma[0] < 1
    with torch.no_grad():
        got = module.family.denoise(module.denoiser, latents, 1000 * sigma, cond)
        torch.testing.assert_close(got, -torch.stack(seen["out"]).squeeze(2), rtol=0, atol=1e-5)
        padded = ~cond.fields["encoder_attention_mask"].bool()
        states = cond.fields["encoder_hidden_states"]
        noisy_pad = torch.where(padded[..., None], torch.randn_like(states), states)
        other = cond.replace(encoder_hidden_states=noisy_pad)
        assert torch.equal(module.family.denoise(module.denoiser, latents, 1000 * sigma, other), got)


def script_loss(pipe, scheduler, pixels, prompts, noise, u, max_sequence_length, prior=False, mu=None):
    """diffusers' train_dreambooth_lora_z_image.py, one step on given noise and u (its density draw), with prior
    preservation (the batch's second half: class images) when ``prior``. ``mu``: shift its sigmas as ZImagePipeline
    samples a dynamic scheduler (the script does not)."""
    vae, transformer = pipe.vae, pipe.transformer
    model_input = vae.encode(pixels).latent_dist.mode()
    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
    timesteps, sigmas = checks.script_draw(scheduler, u, mu)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    timestep_normalized = (1000 - timesteps) / 1000
    prompt_embeds, _ = pipe.encode_prompt(prompt=list(prompts), max_sequence_length=max_sequence_length)
    model_pred_list = transformer(
        list(noisy_model_input.unsqueeze(2).unbind(dim=0)), timestep_normalized, prompt_embeds, return_dict=False
    )[0]
    model_pred = -torch.stack(model_pred_list, dim=0).squeeze(2)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
    target = noise - model_input
    # The script chunks the predictions and targets but not ``weighting`` (the whole batch's, ones here): with one
    # image per half it broadcasts to a copy of the same values; with more it fails to broadcast.
    return checks.script_mse(model_pred, target, weighting, prior, chunk_weighting=False)


@pytest.mark.parametrize("prior", [False, True])
def test_the_training_loss_is_the_scripts(prior):
    torch.manual_seed(0)
    module = z_image()
    perturb(module)
    batch, pixels, prompts, noise, u = checks.dreambooth_batch(PROMPTS, CLASS_PROMPTS, LATENT, prior)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_components("tiny_z_image")["scheduler"]["config"])
    t = 999 - (u * 1000).long()  # lightning-ft's t counts up with the noise; diffusers' table index counts down
    with torch.no_grad():
        expected = script_loss(module.build_pipeline(), scheduler, pixels, prompts, noise, u, 24, prior)
    got = checks.fixed_draws_loss(module, batch, t, noise)
    print(f"prior={prior}: script {expected.item():.8f} lightning-ft {got.item():.8f}")
    assert abs(got.item() - expected.item()) <= 1e-6
    assert module.noise_process.sigmas(t)[0] > (t[0] + 1) / 1000  # Z-Image's fixed shift 3, in both


def test_a_dynamic_shift_trains_where_the_pipeline_samples_and_flow_shift_1_is_the_script():
    """With ``use_dynamic_shifting`` the script trains on its unshifted table while ZImagePipeline samples with
    exp(mu): lightning-ft's default is the pipeline's shift, ``flow_shift=1.0`` the script's."""
    components = copy.deepcopy(tiny_components("tiny_z_image"))
    components["scheduler"]["config"] = {
        "num_train_timesteps": 1000, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
        "base_image_seq_len": 256, "max_image_seq_len": 4096,
    }  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"]["config"])
    batch, pixels, prompts, noise, u = checks.dreambooth_batch(PROMPTS, CLASS_PROMPTS, LATENT, False, seed=2)
    t = 999 - (u * 1000).long()
    losses, dynamic = {}, {}
    for shift in (None, 1.0):
        torch.manual_seed(0)
        module = DreamBooth(components=components, flow_shift=shift, sample_resolution=32, sample_steps=2,
                            backbones=tiny_backbones("tiny_z_image"))  # fmt: skip
        perturb(module)
        # ZImagePipeline's mu: (16 / 2) * (16 / 2) image tokens of 32 px images, the scheduler's settings.
        mu = None if shift == 1.0 else calculate_shift(8 * 8, 256, 4096, 0.5, 1.15)
        with torch.no_grad():
            expected = script_loss(module.build_pipeline(), scheduler, pixels, prompts, noise, u, 24, mu=mu)
        losses[shift], dynamic[shift] = checks.fixed_draws_loss(module, batch, t, noise), module.noise_process.dynamic
        print(f"flow_shift={shift}: script {expected.item():.8f} lightning-ft {losses[shift].item():.8f}")
        assert abs(losses[shift].item() - expected.item()) <= 1e-6
    assert dynamic == {None: True, 1.0: False} and abs(losses[None] - losses[1.0]) > 1e-3


def test_the_export_samples_the_modules_images_in_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    module = z_image()
    perturb(module)
    expected, pipe = checks.export_and_load(module, tmp_path / "export", "ZImagePipeline", PROMPTS)
    # A plain call (its own 512 tokens) with the pipeline's guidance g = w - 1 samples the same images.
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    # (A copy: ZImagePipeline.encode_prompt writes the templated prompts into the list it is given.)
    plain = pipe(list(PROMPTS), height=32, width=32, num_inference_steps=2, guidance_scale=1.5, generator=generators,
                 output_type="pt").images  # fmt: skip
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-5)
    # Guidance w = 1 is the conditional branch alone, the pipeline's g = 0.
    unguided = module.generate(prompts=PROMPTS, seeds=[3, 4], guidance_scale=1.0)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    alone = pipe(list(PROMPTS), height=32, width=32, num_inference_steps=2, guidance_scale=0.0, generator=generators,
                 output_type="pt").images  # fmt: skip
    torch.testing.assert_close(alone, unguided, rtol=0, atol=1e-5)
    assert not torch.allclose(unguided, expected, atol=1e-3)
    # lightning-ft loads the export back as a Z-Image model (its tokenizer's chat template and length with it).
    generate = {"prompts": PROMPTS, "seeds": [3, 4], "guidance_scale": 2.5}
    reloaded = checks.check_loads_back(tmp_path / "export", "z_image", expected, generate, sample_resolution=32)
    assert reloaded.family.max_sequence_length == 24


def test_lora_only_export_loads_with_load_lora_weights(tmp_path):
    torch.manual_seed(0)
    module = z_image(trainable="lora", lora_rank=2, lora_alpha=4)
    perturb(module)
    assert checks.lora_targets(module) == {"to_k", "to_q", "to_v", "to_out.0"}  # the script's default
    lora = {n.split(".")[0] for n, _ in module.denoiser.named_parameters() if "lora" in n}
    assert lora == {"layers", "noise_refiner", "context_refiner"}
    checks.check_lora_only_export(module, tmp_path, z_image, PROMPTS)


@pytest.mark.parametrize("variant", ["ZImageImg2ImgPipeline", "ZImageInpaintPipeline", "ZImageControlNetPipeline"])
def test_image_conditioned_variants_are_refused_by_name(variant, tmp_path):
    torch.manual_seed(0)
    z_image().save_pretrained(tmp_path / "folder")
    checks.check_refused_by_name(tmp_path / "folder", variant)


def test_bnn_fsdp_and_a3fta_find_their_layers():
    torch.manual_seed(0)
    module = z_image()
    family = module.family
    chosen = checks.bnn_chosen(module)
    assert {n.split(".")[0] for n in chosen} == {"layers", "noise_refiner"}
    assert not any("adaLN" in n for n in chosen) and any(n.endswith("attention.to_q") for n in chosen)
    assert any(n.endswith("feed_forward.w2") for n in chosen)
    assert ZImageTransformerBlock in fsdp_block_classes()  # 2 layers + the two refiners' blocks here
    assert sum(isinstance(m, ZImageTransformerBlock) for m in module.denoiser.modules()) == 2 + 1 + 1
    assert set(family.attention_names) <= checks.leaf_names(module)
    assert (REPO / "configs/model/tiny_z_image.yaml").is_file()
