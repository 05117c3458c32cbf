"""SD3 and Flux: conditions equal their pipelines' ``encode_prompt``, Flux's packing and ids are the pipeline's, the
distilled guidance value, the LoRA-only exports load with the pipelines' ``load_lora_weights``, and Diff-Tuning's
and SDFT's timestep rules read sigma through the documented mapping."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import perturb, tiny_module
from diffusers import DiffusionPipeline, FluxPipeline

from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.methods import DiffTuning, DreamBooth, SelfDistillationFineTuning

PROMPTS = ["a red star on a gray background", "a sks circle"]


def test_sd3_conditions_are_the_pipelines_prompt_embeddings():
    torch.manual_seed(0)
    module = tiny_module(DreamBooth, "tiny_sd3").eval()
    pipe = module.build_pipeline()
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False)
    cond = module.encode_prompts(PROMPTS)
    assert module.family.name == "sd3" and module.noise_process.density == "logit_normal"
    torch.testing.assert_close(cond.fields["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.fields["text_embeds"], pooled, rtol=0, atol=1e-6)
    assert embeds.shape[1] == 12 + 256  # CLIP tokens, then T5's max_sequence_length


def test_sd3_without_t5_gets_the_pipelines_zeros():
    from conftest import tiny_components

    components = tiny_components("tiny_sd3")
    components["text_encoder_3"] = components["tokenizer_3"] = None
    torch.manual_seed(0)
    module = DreamBooth(components=components, sample_steps=2).eval()
    pipe = module.build_pipeline()
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False)
    cond = module.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond.fields["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    assert not cond.fields["encoder_hidden_states"][:, 12:].any()


def test_sd3_without_t5_exports_a_folder_plain_diffusers_loads_as_its_record_says(tmp_path):
    import json

    from conftest import tiny_components

    components = tiny_components("tiny_sd3")
    components["text_encoder_3"] = components["tokenizer_3"] = None
    torch.manual_seed(0)
    module = DreamBooth(components=components, sample_steps=2, max_sequence_length=8)
    perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0)
    module.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "lightning_ft.json").read_text())
    assert record["pipeline_load"] == {"text_encoder_3": None, "tokenizer_3": None}
    assert record["pipeline_call"] == {"max_sequence_length": 8}
    pipe = DiffusionPipeline.from_pretrained(tmp_path, **record["pipeline_load"])
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    got = pipe(PROMPTS, num_inference_steps=2, guidance_scale=2.0, generator=generators, output_type="pt",
               **record["pipeline_call"]).images  # fmt: skip
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=1e-5)


def test_flux_conditions_packing_and_ids_are_the_pipelines():
    torch.manual_seed(0)
    module = tiny_module(DreamBooth, "tiny_flux").eval()
    pipe = module.build_pipeline()
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=512)
    cond = module.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond.fields["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.fields["text_embeds"], pooled, rtol=0, atol=1e-6)
    latents = torch.randn(2, 4, 16, 16)
    family = module.family
    torch.testing.assert_close(family.pack(latents), FluxPipeline._pack_latents(latents, 2, 4, 16, 16))
    torch.testing.assert_close(family.unpack(family.pack(latents), 16, 16), latents)
    torch.testing.assert_close(
        family.image_ids(16, 16, "cpu", torch.float32),
        FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
    )
    assert not text_ids.any()


def test_flux_trains_with_the_distilled_guidance_value_and_sigma_timesteps(monkeypatch):
    torch.manual_seed(0)
    module = tiny_module(DreamBooth, "tiny_flux")
    seen = {}
    forward = module.denoiser.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(module.denoiser, "forward", spy)
    t = torch.tensor([100, 900])
    x = torch.randn(2, 4, 16, 16)
    module.predict(x, t, module.encode_prompts(PROMPTS))
    assert seen["guidance"].tolist() == [3.5, 3.5]
    # The transformer gets sigma (FluxPipeline divides its 1000-sigma timesteps by 1000), resolution-shifted.
    torch.testing.assert_close(seen["timestep"], module.noise_process.sigmas(t, x.shape))
    assert module.noise_process.dynamic


@pytest.mark.parametrize("model", ["tiny_sd3", "tiny_flux"])
def test_lora_only_export_loads_with_load_lora_weights(model, tmp_path):
    torch.manual_seed(0)
    module = tiny_module(DreamBooth, model, trainable="lora", lora_rank=2, lora_alpha=4)
    perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0)
    module.save_pretrained(tmp_path / "lora", lora_only=True)
    torch.manual_seed(0)
    tiny_module(DreamBooth, model).save_pretrained(tmp_path / "base")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(tmp_path / "lora")
    pipe.set_progress_bar_config(disable=True)
    got = module.family.sample(module, pipe, SampleInputs.of(prompts=PROMPTS), [0, 1], 2, 2.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    targets = set(next(iter(module.denoiser.peft_config.values())).target_modules)
    assert {"add_q_proj", "to_add_out"} <= targets  # the joint attention's text stream too
    if model == "tiny_flux":
        assert any("single_transformer_blocks" in n and "lora" in n for n, _ in module.denoiser.named_parameters())


def test_timestep_rules_read_sigma_through_the_schedule_position():
    torch.manual_seed(0)
    sdft = tiny_module(SelfDistillationFineTuning, "tiny_sd3", distill_from=0.5)
    t = torch.tensor([0, 498, 499, 999])
    # tau = 0.5 of the schedule: u = (t + 1) / T >= 0.5, i.e. sigma >= shift(0.5) = 0.75 for shift 3.
    assert sdft.distill_weights(t).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert sdft.noise_process.sigmas(torch.tensor([499])).item() == pytest.approx(0.75, abs=1e-6)
    diff = tiny_module(DiffTuning, "tiny_sd3", memory_size=2)
    target = diff.sample_timesteps(4000).float()
    memory = diff.memory_timesteps(4000).float()
    # Target images lean to the noisy end, memory images to the clean end, as on a DDPM model.
    assert target.mean() > 600 and memory.mean() < 400


@pytest.mark.parametrize(
    "fragment,tiny,family",
    [("stable_diffusion_3.yaml", "tiny_sd3.yaml", "sd3"), ("flux.yaml", "tiny_flux.yaml", "flux")],
)
def test_the_config_fragments_build_with_the_experiments(fragment, tiny, family, tmp_path, subject_dir):
    """configs/model/{stable_diffusion_3,flux}.yaml merge with an experiment; a tiny model stands in for the hub's."""
    from conftest import REPO

    from lightning_ft.run import main

    data = tmp_path / "data.yaml"
    data.write_text(f"data:\n  init_args:\n    instance_dir: {subject_dir}\n    num_class_images: 0\n")
    configs = ["experiments/dreambooth_lora.yaml", f"configs/model/{fragment}", f"configs/model/{tiny}"]
    args = [a for c in configs for a in ("--config", str(REPO / c))] + ["--config", str(data)]
    cli = main(args, run=False)
    assert cli.model.family.name == family and cli.model.hparams.lr == 1e-4 and cli.model.hparams.trainable == "lora"
    assert cli.model.noise_process.kind == "flow_matching"


def test_sd3_loss_is_the_scripts_with_and_without_preconditioned_outputs():
    """diffusers' SD3 DreamBooth scripts default to ``--precondition_outputs 1``: the model's output is turned into
    the x0 it implies, ``x_t - sigma * pred``, and scored against x0 (weighted by ``compute_loss_weighting_for_sd3``).
    lightning-ft's SD3 default is the same; ``model.precondition_outputs false`` is the plain flow loss (the script's
    ``--precondition_outputs 0``). Both are computed here the script's way from the same x0, noise, sigma and
    prediction."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    x0 = torch.randn(3, 4, 16, 16)
    noise = torch.randn_like(x0)
    t = torch.tensor([50, 500, 950])
    for precondition in (None, False):
        torch.manual_seed(0)
        module = tiny_module(DreamBooth, "tiny_sd3", precondition_outputs=precondition)
        perturb(module)
        cond = module.encode_prompts(PROMPTS + PROMPTS[:1])
        ours = module.diffusion_loss(x0, cond, t, noise)
        sigmas = module.noise_process.sigmas(t).view(-1, 1, 1, 1)
        noisy = (1 - sigmas) * x0 + sigmas * noise
        pred = module.predict(noisy, t, cond)
        weighting = compute_loss_weighting_for_sd3("none", sigmas)
        if precondition is None:  # the default: the script's --precondition_outputs 1
            assert module.noise_process.precondition_outputs
            script = (weighting * (pred * -sigmas + noisy - x0) ** 2).reshape(3, -1).mean(1)
        else:
            assert not module.noise_process.precondition_outputs
            script = (weighting * (pred - (noise - x0)) ** 2).reshape(3, -1).mean(1)
        torch.testing.assert_close(ours, script, rtol=1e-6, atol=1e-6)
    # The two objectives differ by sigma^2 per sample.
    assert not torch.allclose(ours * sigmas.flatten() ** 2, ours)
    with pytest.raises(ValueError, match="precondition_outputs"):
        tiny_module(DreamBooth, "tiny_t2i", precondition_outputs=True)


def test_diff_tuning_samples_its_memory_bank_at_the_training_resolution(tmp_path, subject_dir):
    """A Flux config has no sample size (its pipeline's default is 1024 px): without ``sample_resolution`` the bank
    must still be drawn at ``data.resolution``, not at the pipeline's default."""
    from lightning_ft.data import LimitedDataModule
    from lightning_ft.methods import DiffTuning

    torch.manual_seed(0)
    module = tiny_module(DiffTuning, "tiny_flux", sample_resolution=None, memory_size=2, memory_sample_steps=1,
                         memory_cache_dir=str(tmp_path / "bank"))  # fmt: skip
    assert module.native_resolution() == 128 * 2  # the pipeline default of this tiny VAE (latent 128 x 2)
    data = LimitedDataModule(instance_dir=str(subject_dir), instance_prompt=PROMPTS[0], resolution=32, batch_size=2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.datamodule = data
    module.trainer = trainer
    bank = module.prepare_memory_bank()
    assert tuple(bank.shape[-2:]) == (32, 32)
    assert module.native_resolution() == 256  # the block restored it


def test_flux_loss_is_the_scripts_with_flow_shift_1_and_the_default_shift_is_the_pipelines():
    """diffusers' train_dreambooth_lora_flux.py: sigma from its scheduler copy's table (unshifted: Flux's scheduler
    has ``use_dynamic_shifting``), x_t = (1 - sigma) x0 + sigma eps, the transformer on packed latents at sigma with
    guidance 3.5, unpacked, target eps - x0, weighting ``none``. lightning-ft gives that loss with
    ``model.flow_shift 1.0``; its default trains at the resolution-dependent shift the pipeline samples with."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 16, 16)
    noise = torch.randn_like(x0)
    index = torch.tensor([100, 700])  # the script's floor(u * T)
    losses = {}
    for shift in (1.0, None):
        torch.manual_seed(0)
        module = tiny_module(DreamBooth, "tiny_flux", flow_shift=shift)
        perturb(module)
        t = module.noise_process.num_train_timesteps - 1 - index
        cond = module.encode_prompts(PROMPTS)
        losses[shift] = module.diffusion_loss(x0, cond, t, noise).mean()
    pipe = module.build_pipeline()
    table = type(module.noise_scheduler).from_config(module.noise_scheduler.config)
    timesteps = table.timesteps[index]
    sigmas = table.sigmas[index].view(-1, 1, 1, 1)
    noisy = (1 - sigmas) * x0 + sigmas * noise
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=512)
    image_ids = FluxPipeline._prepare_latent_image_ids(2, 8, 8, x0.device, x0.dtype)
    with torch.no_grad():
        pred = module.denoiser(
            hidden_states=FluxPipeline._pack_latents(noisy, 2, 4, 16, 16), timestep=timesteps / 1000,
            guidance=torch.tensor([3.5]).expand(2), pooled_projections=pooled, encoder_hidden_states=embeds,
            txt_ids=text_ids, img_ids=image_ids,
        ).sample  # fmt: skip
    side = 16 * pipe.vae_scale_factor
    pred = FluxPipeline._unpack_latents(pred, side, side, pipe.vae_scale_factor)
    weighting = compute_loss_weighting_for_sd3("none", sigmas)
    script = (weighting * (pred - (noise - x0)) ** 2).reshape(2, -1).mean(1).mean()
    torch.testing.assert_close(losses[1.0].detach(), script, rtol=1e-6, atol=1e-6)
    assert abs(losses[None].item() - script.item()) > 1e-4  # the default is another objective, on purpose
