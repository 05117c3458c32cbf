"""FLUX.2 dev and klein: conditions equal the pipelines' ``encode_prompt``, the training loss equals diffusers'
DreamBooth-LoRA scripts' loss (with their unshifted sigmas; the default shift differs, by the measured amount), the
export and the LoRA-only export sample the module's images in plain diffusers, and variant pipelines are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import perturb, tiny_components, tiny_module
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.training_utils import compute_loss_weighting_for_sd3

import lightning_ft.core.noise_process as noise_process
from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.methods import DreamBooth

PROMPTS = ["a sks star on a gray background", "a red circle"]
CLASS_PROMPTS = ["a star on a gray background", "a circle"]
#: family -> (tiny config, pipeline class, the pipeline's text_encoder_out_layers, the script's training guidance).
MODELS = {
    "flux2": ("tiny_flux2", Flux2Pipeline, (10, 20, 30), 3.5),
    "flux2_klein": ("tiny_flux2_klein", Flux2KleinPipeline, (9, 18, 27), None),
}


def build(family: str, **kwargs):
    torch.manual_seed(0)
    module = tiny_module(DreamBooth, MODELS[family][0], **kwargs)
    # Batch-norm statistics a fresh VAE does not have (0 and 1 would hide the normalisation), from their own seed.
    generator = torch.Generator().manual_seed(3)
    bn = module.vae.bn
    bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator))
    bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) * 1.5 + 0.5)
    return module


@pytest.mark.parametrize("family", list(MODELS))
def test_conditions_are_the_pipelines_encode_prompt(family):
    module = build(family).eval()
    _, pipeline_class, layers, _ = MODELS[family]
    assert module.family.name == family and module.family.layers == layers
    pipe = module.build_pipeline()
    assert type(pipe) is pipeline_class
    prompts = [*PROMPTS, ""]  # the empty prompt: condition dropout's, and klein's negative branch
    length = module.family.max_sequence_length
    embeds, text_ids = pipe.encode_prompt(prompts, max_sequence_length=length)
    cond = module.encode_prompts(prompts)
    torch.testing.assert_close(cond.fields["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    assert torch.equal(cond.fields["txt_ids"], text_ids.to(cond.fields["txt_ids"]))
    assert embeds.shape == (3, length, 3 * 16)  # three layers of the 16-wide encoder, layer-major
    assert not torch.allclose(embeds[..., :16], embeds[..., 32:], atol=1e-3)  # three different layers
    ids, mask = module.family.tokenize(module.parts, prompts)
    assert mask[2].sum() > 10 and ids.shape == (3, length)  # the empty prompt is templated too


@pytest.mark.parametrize("family", list(MODELS))
def test_training_loss_is_the_scripts_and_the_default_shift_differs(family, monkeypatch):
    _, pipeline_class, _, guidance = MODELS[family]
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {"pixel_values": images[:2], "class_pixel_values": images[2:], "prompts": PROMPTS,
             "class_prompts": CLASS_PROMPTS}  # fmt: skip
    u = torch.tensor([0.07, 0.41, 0.66, 0.93])
    noise = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(noise_process, "compute_density_for_timestep_sampling", lambda *args, **kwargs: u)

    def module_loss(**kwargs):
        module = build(family, prior_loss_weight=0.7, **kwargs)
        perturb(module)
        monkeypatch.setattr(module, "make_noise", lambda x0: noise)
        with torch.no_grad():
            return module, module.training_loss(batch)[0]

    module, loss = module_loss(flow_shift=1.0)
    reference = script_loss(module, pipeline_class, batch, u, noise, guidance, prior_loss_weight=0.7)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    # The default: the scheduler's resolution shift, the 200-step line of the pipeline's empirical mu (64 tokens).
    default, default_loss = module_loss()
    mu = default.noise_process.mu((4, 16, 8, 8))
    assert mu == pytest.approx(compute_empirical_mu(64, 200), abs=1e-4)
    assert default.noise_process.mu((1, 16, 80, 55)) == pytest.approx(compute_empirical_mu(4400, 4), abs=1e-4)
    unshifted = (1000 - (u * 1000).long()) / 1000  # the script's table at its index floor(1000 u)
    sigmas = default.noise_process.sigmas(default.sample_timesteps(4), (4, 16, 8, 8))
    torch.testing.assert_close(sigmas, math.exp(mu) / (math.exp(mu) + 1 / unshifted - 1), rtol=0, atol=1e-6)
    difference = (default_loss - reference).abs().item()
    assert difference > 1e-3, difference  # printed below (pytest -s)
    print(
        f"{family}: script {reference.item():.7f}, flow_shift=1.0 {loss.item():.7f} (|diff| "
        f"{(loss - reference).abs().item():.1e}), default {default_loss.item():.7f} (|diff| {difference:.4f})"
    )


def script_loss(module, pipeline_class, batch, u, noise, guidance, prior_loss_weight):
    """The loss of train_dreambooth_lora_flux2{,_klein}.py for one batch with prior preservation, step by step, with
    the pipeline's own helpers where the script uses them."""
    vae, transformer = module.vae, module.denoiser
    pipe = module.build_pipeline()  # the script's text-encoding pipeline
    length = module.family.max_sequence_length
    embeds, text_ids = pipe.encode_prompt([*batch["prompts"], *batch["class_prompts"]], max_sequence_length=length)
    pixels = torch.cat([batch["pixel_values"], batch["class_pixel_values"]])
    with torch.no_grad():
        model_input = pipeline_class._patchify_latents(vae.encode(pixels).latent_dist.mode())
        bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
        bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        model_input = (model_input - bn_mean) / bn_std
        ids = pipeline_class._prepare_latent_ids(model_input)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(module.noise_scheduler.config)  # from_pretrained
        timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
        steps = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
        sigmas = scheduler.sigmas[steps].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * model_input + sigmas * noise
        packed = pipeline_class._pack_latents(noisy)
        g = torch.full([1], guidance).expand(len(packed)) if guidance is not None else None
        pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=g, encoder_hidden_states=embeds,
                           txt_ids=text_ids, img_ids=ids, return_dict=False)[0]  # fmt: skip
        pred = pipeline_class._unpack_latents_with_ids(pred[:, : packed.size(1)], ids)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
        target = noise - model_input
        per_sample = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(len(target), -1).mean(1)
    n = len(batch["pixel_values"])
    return per_sample[:n].mean() + prior_loss_weight * per_sample[n:].mean()


@pytest.mark.parametrize("family", list(MODELS))
def test_latent_space_and_token_layout_are_the_pipelines_on_a_non_square_grid(family):
    module = build(family)
    _, pipeline_class, _, _ = MODELS[family]
    latents = torch.randn(2, 4, 6, 10)
    vae = module.vae
    expected = pipeline_class._patchify_latents(latents) - vae.bn.running_mean.view(1, -1, 1, 1)
    expected = expected / torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    x = module.family.model_latents(vae, latents)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert torch.equal(module.family.pack(x), pipeline_class._pack_latents(x))
    assert torch.equal(module.family.image_ids(3, 5, "cpu"), pipeline_class._prepare_latent_ids(x)[0])


@pytest.mark.parametrize("family", list(MODELS))
def test_export_loads_in_plain_diffusers_and_samples_the_same_images(family, tmp_path):
    module = build(family)
    perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)
    module.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "lightning_ft.json").read_text())
    # The tiny tokenizers are shorter than the pipelines' 512 tokens: the export says what to call it with.
    assert record["pipeline_call"] == {"max_sequence_length": module.family.max_sequence_length}
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe) is MODELS[family][1]
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    got = pipe(prompt=PROMPTS, height=32, width=32, num_inference_steps=2, guidance_scale=2.0, generator=generators,
               output_type="pt", **record["pipeline_call"]).images  # fmt: skip
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(MODELS))
def test_lora_only_export_loads_with_load_lora_weights(family, tmp_path):
    module = build(family, trainable="lora", lora_rank=2, lora_alpha=4)
    perturb(module)
    targets = set(next(iter(module.denoiser.peft_config.values())).target_modules)
    assert {"to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out", "to_out.0"} <= targets
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in module.denoiser.named_parameters() if ".lora_" in n}
    assert "single_transformer_blocks.0.attn.to_out" in adapted
    assert "transformer_blocks.0.attn.add_q_proj" not in adapted  # the text stream: not a script target
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0)
    module.save_pretrained(tmp_path / "lora", lora_only=True)
    build(family).save_pretrained(tmp_path / "base")  # the same random base
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.set_progress_bar_config(disable=True)
    before = module.family.sample(module, pipe, SampleInputs.of(prompts=PROMPTS), [0, 1], 2, 2.0)
    pipe.load_lora_weights(tmp_path / "lora")
    got = module.family.sample(module, pipe, SampleInputs.of(prompts=PROMPTS), [0, 1], 2, 2.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert not torch.allclose(before, expected, atol=1e-3)


@pytest.mark.parametrize("variant", ["Flux2KleinInpaintPipeline", "Flux2KleinKVPipeline"])
def test_variant_pipelines_are_refused_by_name(variant, tmp_path):
    build("flux2_klein").save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": variant}))
    with pytest.raises(NotImplementedError, match=variant):
        DreamBooth(pretrained=str(tmp_path), sample_steps=2)


def test_klein_refuses_a_guidance_embedding_transformer():
    components = tiny_components("tiny_flux2_klein")
    components["denoiser"]["config"] = {**components["denoiser"]["config"], "guidance_embeds": True}
    with pytest.raises(ValueError, match="guidance"):
        DreamBooth(components=components, sample_steps=2)
