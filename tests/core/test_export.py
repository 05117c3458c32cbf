"""Export writes a diffusers folder that plain diffusers loads and that samples exactly like the module."""

from __future__ import annotations

import torch
from conftest import tiny_module
from diffusers import DiffusionPipeline

PROMPTS = ["a red star on a gray background", "a sks star on a navy background"]


def _pipeline_images(pipe, seeds, steps, guidance):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt")
    return out.images.float()


def _perturb(module):
    # Fresh tiny models output near-zero: move the weights so the comparison is not trivially equal.
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_full_export_reloads_with_plain_diffusers_and_matches(tmp_path):
    torch.manual_seed(0)
    module = tiny_module()
    _perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[3, 4], steps=3, guidance_scale=2.0)
    module.save_pretrained(tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    got = _pipeline_images(pipe, [3, 4], 3, 2.0)
    assert torch.equal(expected, got)
    assert not torch.equal(got[0], got[1])


def test_generate_is_per_seed_independent_of_batching():
    torch.manual_seed(0)
    module = tiny_module()
    _perturb(module)
    together = module.generate(prompts=PROMPTS, seeds=[1, 2], steps=2)
    alone = module.generate(prompts=PROMPTS[1:], seeds=[2], steps=2)
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_lora_export_merged_and_lora_only(tmp_path):
    torch.manual_seed(0)
    module = tiny_module(trainable="lora", lora_rank=2)
    _perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], steps=2, guidance_scale=1.5)

    module.save_pretrained(tmp_path / "merged")
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    base_params = sum(p.numel() for p in tiny_module().denoiser.parameters())
    assert sum(p.numel() for p in merged.unet.parameters()) == base_params  # plain architecture, LoRA folded in
    assert torch.allclose(_pipeline_images(merged, [0, 1], 2, 1.5), expected, atol=1e-4)

    module.save_pretrained(tmp_path / "lora", lora_only=True)
    torch.manual_seed(0)
    base = tiny_module()  # same seed -> the same random base weights the LoRA module started from
    base.save_pretrained(tmp_path / "base")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(tmp_path / "lora")
    assert torch.allclose(_pipeline_images(pipe, [0, 1], 2, 1.5), expected, atol=1e-4)


def test_an_export_keeps_the_backbones_its_pretrained_folder_declares(tmp_path):
    """A fine-tuned model is scored like the model it came from: its export carries ``lightning_ft.json``."""
    import json

    from lightning_ft.core import DiffusionBase
    from lightning_ft.metrics import backbone_spec, declared_backbones

    torch.manual_seed(0)
    tiny_module().save_pretrained(tmp_path / "base")
    declaration = {"backbones": {"identity": {"name": "dinov2", "path": "/models/dinov2"}}}
    (tmp_path / "base" / "lightning_ft.json").write_text(json.dumps(declaration))
    module = DiffusionBase(pretrained=str(tmp_path / "base"), sample_steps=2)
    module.save_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "lightning_ft.json").read_text()) == declaration
    exported = declared_backbones(tmp_path / "export")
    assert backbone_spec("identity", declared=exported) == ("dinov2", "/models/dinov2")
    # A model built from configs declares what its `backbones` argument says, or nothing.
    tiny_module(backbones=None).save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "lightning_ft.json").exists()
    tiny_module().save_pretrained(tmp_path / "tiny")
    assert declared_backbones(tmp_path / "tiny")["identity"]["name"] == "lightning_ft.embedded.backbones:identity"


def test_an_export_keeps_the_folders_own_sampler_and_a_ddpm_folder_samples_with_ddim(tmp_path):
    """diffusers' DreamBooth scripts keep the base folder's scheduler (SD1.5's PNDM, SDXL's Euler) in what they
    save; so does the export. A plain DDPMScheduler (a training scheduler) samples with DDIM, and the model card says
    so, naming both."""
    import json

    from conftest import tiny_components

    from lightning_ft.core import DiffusionBase

    components = tiny_components()
    scheduler = {"class": "PNDMScheduler", "config": {**components["scheduler"]["config"], "skip_prk_steps": True}}
    scheduler["config"].pop("clip_sample")
    torch.manual_seed(0)
    module = DiffusionBase(components={**components, "scheduler": scheduler}, sample_steps=2)
    assert type(module.sampling_scheduler()).__name__ == "PNDMScheduler"
    module.save_pretrained(tmp_path / "pndm")
    saved = json.loads((tmp_path / "pndm" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "PNDMScheduler"
    # Training still adds noise with the DDPM forward process of the same betas.
    assert type(module.noise_process.scheduler).__name__ == "DDPMScheduler"
    assert type(tiny_module().sampling_scheduler()).__name__ == "DDIMScheduler"


def test_the_model_card_names_a_sampler_that_is_not_the_base_folders(tmp_path):
    from lightning_ft.report.model_card import CardFacts, card_text

    facts = CardFacts(method="DreamBooth", method_path="m", settings={}, pretrained=None, scheduler="DDIMScheduler",
                      base_scheduler="DDPMScheduler")  # fmt: skip
    text = card_text(facts, "")
    assert "`DDIMScheduler`, not the base folder's `DDPMScheduler`" in text and "model.sample_scheduler" in text
    same = card_text(CardFacts(method="D", method_path="m", settings={}, pretrained=None, scheduler="PNDMScheduler",
                               base_scheduler="PNDMScheduler"), "")  # fmt: skip
    assert "samples with `PNDMScheduler`." in same and "not the base" not in same
