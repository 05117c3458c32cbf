"""HiDream-I1: conditions equal ``HiDreamImagePipeline.encode_prompt`` (two CLIP pooled outputs, T5 states, every Llama
layer, each padded as the pipeline pads it), the transformer is called as the pipeline calls it (1000 sigma, output
negated; its training-mode per-token layout folded back), the training loss equals diffusers' DreamBooth-LoRA script's
on the same batch, noise and timesteps (the script's ``force_inference_output`` transformer beside lightning-ft's
training-mode one), the full and LoRA-only exports sample the module's images in plain diffusers (the pipeline's
fixed-area sizing included), the editing pipeline is refused by name, and BNN / FSDP / A3FTA find their layers."""

from __future__ import annotations

import family_checks as checks
import pytest
import torch
from conftest import REPO, perturb, tiny_backbones, tiny_components, tiny_module
from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline
from diffusers.models.transformers.transformer_hidream_image import (
    HiDreamImageSingleTransformerBlock,
    HiDreamImageTransformer2DModel,
    HiDreamImageTransformerBlock,
)
from diffusers.training_utils import compute_loss_weighting_for_sd3

from lightning_ft.core.families import detect_family, fsdp_block_classes
from lightning_ft.methods import DreamBooth

PROMPTS = ["a sks star on a gray background", "a red circle"]
CLASS_PROMPTS = ["a star on a gray background", "a blue square"]
FIELDS = ("encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds")


def hidream(**kwargs):
    return tiny_module(DreamBooth, "tiny_hidream", **kwargs)


def text_pipeline(module):
    """The script's ``text_encoding_pipeline``: the pipeline with its four encoders, no VAE nor transformer."""
    encoders = {key: getattr(module, key) for key in module.family.text_encoders}
    tokenizers = {key.replace("text_encoder", "tokenizer"): getattr(module, key.replace("text_encoder", "tokenizer"))
                  for key in module.family.text_encoders}  # fmt: skip
    return HiDreamImagePipeline(scheduler=None, vae=None, transformer=None, **encoders, **tokenizers)


def as_pipeline(cond) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A condition in ``encode_prompt``'s layout: T5 (B, L, D), Llama (layers, B, L, D), pooled (B, D)."""
    f = cond.fields
    return f["encoder_hidden_states_t5"], f["encoder_hidden_states_llama3"].transpose(0, 1), f["pooled_embeds"]


def test_conditions_are_the_pipelines_encode_prompt():
    torch.manual_seed(0)
    module = hidream().eval()
    family = module.family
    assert family.name == "hidream" and family.max_sequence_length == 128  # the pipeline's and the script's default
    # Four text encoders, each paired with its tokenizer by suffix (tokenizer_4: the Llama one).
    assert family.tokenizer_keys(module.parts) == ["tokenizer", "tokenizer_2", "tokenizer_3", "tokenizer_4"]
    # Llama pads with its eos token, as the pipeline sets it, before any pipeline is built.
    assert module.tokenizer_4.pad_token == module.tokenizer_4.eos_token == "<eos>"
    ids = family.tokenize(module.parts, PROMPTS)
    # CLIP: min(128, 218) tokens, whatever the tokenizer's own length; T5 and Llama: min(128, model_max_length = 16).
    assert [tuple(t.shape) for t in ids] == [(2, 128), (2, 128), (2, 16), (2, 16), (2, 16), (2, 16)]
    assert ids[4][1, ids[5][1] == 0].eq(module.tokenizer_4.eos_token_id).all()  # Llama padding: eos, masked
    cond = module.encode_prompts([*PROMPTS, ""])
    pipe = module.build_pipeline()
    assert isinstance(pipe, HiDreamImagePipeline)
    t5, negative_t5, llama, negative_llama, pooled, negative_pooled = pipe.encode_prompt(list(PROMPTS))
    assert llama.shape == (2, 2, 16, 16)  # every Llama layer but the embeddings: (layers, B, L, D)
    mine = as_pipeline(cond)
    for got, theirs in zip(mine, (t5, llama, pooled)):
        torch.testing.assert_close(got[:2] if got.ndim != 4 else got[:, :2], theirs, rtol=0, atol=1e-6)
    # The third prompt "" is the pipeline's default negative (do_classifier_free_guidance), and the null condition.
    for got, theirs in zip(mine, (negative_t5, negative_llama, negative_pooled)):
        torch.testing.assert_close(got[2:] if got.ndim != 4 else got[:, 2:], theirs[:1] if got.ndim != 4 else
                                   theirs[:, :1], rtol=0, atol=1e-6)  # fmt: skip
    null = module.null_condition(1)
    for name in FIELDS:
        torch.testing.assert_close(null.fields[name], cond.fields[name][2:], rtol=0, atol=1e-6)
    # Different prompts, different conditions in every encoder.
    for name in FIELDS:
        assert not torch.allclose(cond.fields[name][0], cond.fields[name][1])


def test_the_transformer_is_called_as_the_pipeline_calls_it():
    """One pipeline step (no guidance) captured at the transformer: the family's call on the same latents and
    timesteps gives the negated output; in training mode the per-token output is folded back to the same latents."""
    torch.manual_seed(0)
    module = hidream().eval()
    perturb(module)
    pipe = module.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with checks.last_denoiser_call(module) as seen:
        module.family.sample(module, pipe, module.family.sample_inputs(prompts=PROMPTS), [0, 1], 2, 1.0)
    assert pipe.default_sample_size == 128  # put back after the call
    x, t = seen["hidden_states"], seen["timesteps"]
    assert x.shape == (2, 4, 16, 16) and 0 < t[0] < 1000  # 32 px at the tiny VAE's factor 2; 1000 sigma
    cond = module.encode_prompts(PROMPTS)
    for got, theirs in zip(as_pipeline(cond), ("encoder_hidden_states_t5", "encoder_hidden_states_llama3",
                                               "pooled_embeds")):  # fmt: skip
        torch.testing.assert_close(got, seen[theirs], rtol=0, atol=1e-6)
    with torch.no_grad():
        got = module.family.denoise(module.denoiser, x, t, cond)
        torch.testing.assert_close(got, -seen["out"], rtol=0, atol=1e-6)
        # Training mode: the transformer returns (B, C, tokens, 4) and routes its experts differently; the family
        # folds the layout back (square and non-square latents, the latter padded to max_seq tokens).
        wide = torch.randn(2, 4, 8, 16)
        eval_wide = module.family.denoise(module.denoiser, wide, t, cond)
        module.denoiser.train()
        raw = module.denoiser(hidden_states=x, timesteps=t, encoder_hidden_states_t5=seen["encoder_hidden_states_t5"],
                              encoder_hidden_states_llama3=seen["encoder_hidden_states_llama3"],
                              pooled_embeds=seen["pooled_embeds"]).sample  # fmt: skip
        assert raw.shape == (2, 4, 64, 4)
        torch.testing.assert_close(module.family.denoise(module.denoiser, x, t, cond), got, rtol=0, atol=1e-6)
        torch.testing.assert_close(module.family.denoise(module.denoiser, wide, t, cond), eval_wide, rtol=0, atol=1e-6)


def script_transformer(module) -> HiDreamImageTransformer2DModel:
    """The module's transformer as the script loads it (``force_inference_output=True``) and trains it (train mode)."""
    transformer = HiDreamImageTransformer2DModel.from_config(module.denoiser.config, force_inference_output=True)
    transformer.load_state_dict(module.denoiser.state_dict())
    return transformer.train()


def script_loss(module, pixels, prompts, noise, u, prior=False, transformer=None):
    """diffusers' train_dreambooth_lora_hidream.py, one step on given noise and u (its density draw), with prior
    preservation (the batch's second half: class images) when ``prior``; prompts encoded per batch (the script's
    path with per-image prompts, whose collate_fn appends the class prompts)."""
    transformer = transformer or script_transformer(module)
    # FlowMatchEulerDiscreteScheduler.from_pretrained(..., subfolder="scheduler", shift=3.0)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(module.noise_scheduler.config, shift=3.0)
    vae = module.vae
    t5, _, llama, _, pooled, _ = text_pipeline(module).encode_prompt(prompt=list(prompts), max_sequence_length=128)
    torch.manual_seed(1234)  # the posterior draw
    model_input = vae.encode(pixels).latent_dist.sample()
    model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
    timesteps, sigmas = checks.script_draw(scheduler, u)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    model_pred = transformer(hidden_states=noisy_model_input, encoder_hidden_states_t5=t5,
                             encoder_hidden_states_llama3=llama, pooled_embeds=pooled, timesteps=timesteps,
                             return_dict=False)[0]  # fmt: skip
    model_pred = model_pred * -1
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
    target = noise - model_input
    # As the script: predictions and targets chunked, ``weighting`` not (ones; one image per half broadcasts).
    return checks.script_mse(model_pred, target, weighting, prior, chunk_weighting=False)


@pytest.mark.parametrize("prior", [False, True])
def test_the_training_loss_is_the_scripts(prior):
    torch.manual_seed(0)
    module = hidream()
    perturb(module)
    batch, pixels, prompts, noise, u = checks.dreambooth_batch(PROMPTS, CLASS_PROMPTS, (4, 16, 16), prior)
    t = 999 - (u * 1000).long()  # lightning-ft's t counts up with the noise; diffusers' table index counts down
    module.sample_timesteps = lambda n: t
    module.make_noise = lambda x0: noise
    assert module.denoiser.training and not module.denoiser.config.force_inference_output
    with torch.no_grad():
        expected = script_loss(module, pixels, prompts, noise, u, prior)
        torch.manual_seed(1234)  # the posterior draw, as in script_loss
        got, _ = module.training_loss(batch)
    print(f"prior={prior}: script {expected.item():.8f} lightning-ft {got.item():.8f}")
    assert got.item() == pytest.approx(expected.item(), abs=1e-6, rel=0)
    assert module.noise_process.sigmas(t)[0] > (t[0] + 1) / 1000  # the fixed shift 3, in both


def test_gradients_reach_the_routed_experts_where_the_scripts_do_not():
    """The same loss, two gradients: the training-mode MoE is differentiable; the script's force_inference_output
    transformer runs its routed experts under no_grad (only the shared experts learn)."""
    torch.manual_seed(0)
    module = hidream()
    perturb(module)
    batch, pixels, prompts, noise, u = checks.dreambooth_batch(PROMPTS, CLASS_PROMPTS, (4, 16, 16), False)
    module.sample_timesteps = lambda n: 999 - (u * 1000).long()
    module.make_noise = lambda x0: noise
    torch.manual_seed(1234)  # the posterior draw, as in script_loss
    loss, _ = module.training_loss(batch)
    loss.backward()
    grads = {n: p.grad for n, p in module.denoiser.named_parameters()}
    transformer = script_transformer(module)
    script = script_loss(module, pixels, prompts, noise, u, transformer=transformer)
    assert script.item() == pytest.approx(loss.item(), abs=1e-6, rel=0)
    script.backward()
    script = {n: p.grad for n, p in transformer.named_parameters()}
    routed = [n for n in grads if ".ff_i.experts." in n]
    assert routed and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in routed)
    assert all(script[n] is None for n in routed)
    # Everything upstream of a routed expert gets another gradient (the script's misses the routed experts' path).
    shared = "double_stream_blocks.0.block.ff_i.shared_experts.w1.weight"
    attention = "single_stream_blocks.0.block.attn1.to_q.weight"
    for name in (shared, attention):
        assert script[name] is not None and grads[name] is not None and not torch.allclose(script[name], grads[name])


def test_the_export_samples_the_modules_images_in_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    module = hidream()
    perturb(module)
    expected, pipe = checks.export_and_load(module, tmp_path / "export", "HiDreamImagePipeline", PROMPTS)
    assert expected.shape == (2, 3, 32, 32)
    # A plain call samples at the area of default_sample_size (128 latent px) x vae_scale_factor whatever height and
    # width it is given (why the family sets that attribute when it samples) ...
    assert pipe.default_sample_size == 128
    big = pipe(PROMPTS[:1], height=32, width=32, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    assert big.images.shape == (1, 4, 128, 128)
    # ... and samples the module's images once that default side is the one asked for.
    pipe.default_sample_size = 16
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    plain = pipe(list(PROMPTS), height=32, width=32, num_inference_steps=2, guidance_scale=2.5, generator=generators,
                 output_type="pt").images  # fmt: skip
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-5)
    # Guidance w <= 1 is the conditional branch alone, as the pipeline's.
    unguided = module.generate(prompts=PROMPTS, seeds=[3, 4], guidance_scale=1.0)
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    alone = pipe(list(PROMPTS), num_inference_steps=2, guidance_scale=1.0, generator=generators,
                 output_type="pt").images  # fmt: skip
    torch.testing.assert_close(alone, unguided, rtol=0, atol=1e-5)
    assert not torch.allclose(unguided, expected, atol=1e-3)
    # lightning-ft loads the export back as a HiDream model.
    generate = {"prompts": PROMPTS, "seeds": [3, 4], "guidance_scale": 2.5}
    checks.check_loads_back(tmp_path / "export", "hidream", expected, generate, sample_resolution=32)


def test_lora_only_export_loads_with_load_lora_weights(tmp_path):
    torch.manual_seed(0)
    module = hidream(trainable="lora", lora_rank=2, lora_alpha=4)
    perturb(module)
    assert checks.lora_targets(module) == {"to_k", "to_q", "to_v", "to_out"}  # the script's default
    lora = {n.split(".lora")[0].split(".", 2)[-1] for n, _ in module.denoiser.named_parameters() if "lora" in n}
    assert lora == {"block.attn1.to_q", "block.attn1.to_k", "block.attn1.to_v", "block.attn1.to_out"}  # image stream
    checks.check_lora_only_export(module, tmp_path, hidream, PROMPTS)


def test_the_editing_pipeline_is_refused_by_name_and_components_are_recognised(tmp_path):
    torch.manual_seed(0)
    module = hidream()
    assert detect_family(module.parts) == "hidream"  # built from configs: recognised by its transformer
    module.save_pretrained(tmp_path / "folder")
    checks.check_refused_by_name(tmp_path / "folder", "HiDreamImageEditingPipeline")


def test_a_model_without_its_llama_is_refused_naming_it():
    components = {k: v for k, v in tiny_components("tiny_hidream").items() if not k.endswith("_4")}
    with pytest.raises(ValueError, match="missing: text_encoder_4.*LlamaForCausalLM"):
        DreamBooth(components=components, sample_resolution=32, backbones=tiny_backbones("tiny_hidream"))


def test_bnn_fsdp_and_a3fta_find_their_layers():
    torch.manual_seed(0)
    module = hidream()
    family = module.family
    from lightning_ft.nn.adapters import insert_adapters

    chosen = checks.bnn_chosen(module)
    assert {n.split(".")[0] for n in chosen} == {"double_stream_blocks", "single_stream_blocks"}
    assert not any("adaLN" in n or n.endswith(("_t", "_t.w1")) or ".ff_t." in n for n in chosen)
    assert any(n.endswith("attn1.to_q") for n in chosen) and any(".ff_i.experts.0.w2" in n for n in chosen)
    assert {HiDreamImageTransformerBlock, HiDreamImageSingleTransformerBlock} <= fsdp_block_classes()
    assert set(family.attention_names) <= checks.leaf_names(module)
    adapters = insert_adapters(module.denoiser, family.attention_names, time_embedding=family.time_embedding)
    assert sorted(adapters) == ["double_stream_blocks.0.block.attn1", "single_stream_blocks.0.block.attn1"]
    assert (REPO / "configs/model/tiny_hidream.yaml").is_file()
