"""DiT through the module: LoRA-only export in PEFT's format put back on a plain DiT, the full export's class record,
and the export loaded back by the module with its real class count and null class."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb, tiny_module
from diffusers import DiffusionPipeline

from lightning_ft.core import DiffusionBase
from lightning_ft.core.trainable import load_peft_lora
from lightning_ft.methods import BayesianFineTuning, DiffTuning, DreamBooth


def dit(cls=DreamBooth, **kwargs):
    return tiny_module(cls, "tiny_dit", **kwargs)


def test_lora_only_export_of_a_dit_goes_back_on_a_plain_dit(tmp_path):
    torch.manual_seed(0)
    module = dit(BayesianFineTuning, trainable="lora", lora_rank=2)  # a Bayesian LoRA exports its means
    perturb(module)
    expected = module.generate(labels=[1, 2], seeds=[0, 1], guidance_scale=2.0)
    module.save_pretrained(tmp_path / "lora", lora_only=True)
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    torch.manual_seed(0)
    plain = dit()  # the same random base
    load_peft_lora(plain.denoiser, tmp_path / "lora")
    torch.testing.assert_close(
        plain.generate(labels=[1, 2], seeds=[0, 1], guidance_scale=2.0), expected, atol=1e-5, rtol=0
    )


def test_full_export_records_the_real_classes_and_reloads_with_them(tmp_path):
    torch.manual_seed(0)
    module = dit()
    perturb(module)
    module.save_pretrained(tmp_path / "export")
    record = json.loads((tmp_path / "export" / "lightning_ft.json").read_text())["class_labels"]
    assert record["num_classes"] == 48 and record["null_class"] == 48
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    assert pipe.transformer.config.num_embeds_ada_norm == 1000  # padded for DiTPipeline's null class
    reloaded = DiffTuning(pretrained=str(tmp_path / "export"), sample_steps=2, memory_size=5)
    assert reloaded.null_class == 48 and reloaded.family.classes() == list(range(48))
    assert reloaded.memory_inputs().labels == (0, 1, 2, 3, 4)
    images = module.generate(labels=[3, 4], seeds=[5, 6], guidance_scale=2.0)
    torch.testing.assert_close(
        reloaded.generate(labels=[3, 4], seeds=[5, 6], guidance_scale=2.0), images, atol=1e-5, rtol=0
    )
    # The reloaded model exports again the same way (its table is already 1001 rows).
    reloaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "lightning_ft.json").read_text())["class_labels"]
    assert again["num_classes"] == 48 and again["null_class"] == 48


def test_class_images_are_sampled_by_label_for_prior_preservation(tmp_path, subject_dir):
    from conftest import quiet_trainer

    from lightning_ft.data import LimitedDataModule

    torch.manual_seed(0)
    module = dit(prior_loss_weight=1.0)
    data = LimitedDataModule(str(subject_dir), instance_prompt="x", class_label=3, class_image_label=5,
                             num_class_images=2, resolution=32, batch_size=2,
                             class_cache_dir=str(tmp_path))  # fmt: skip
    calls = []
    original = module.generate

    def spy(**kwargs):
        calls.append(kwargs.get("labels"))
        return original(**kwargs)

    module.generate = spy
    quiet_trainer(max_steps=1).fit(module, datamodule=data)
    assert calls and all(set(c) == {5} for c in calls)
    item = data.dataset[0]
    assert item["class_labels"] == 3 and item["class_class_labels"] == 5
    missing = LimitedDataModule(str(subject_dir), instance_prompt="x", class_label=3, class_prompt="a star",
                                num_class_images=2, resolution=32, class_cache_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match="data.class_image_label"):
        quiet_trainer(max_steps=1).fit(dit(), datamodule=missing)


def test_dit_defaults_pick_transformer_layers():
    torch.manual_seed(0)
    lora = dit(trainable="lora")
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all("lora" in n and ".attn1." in n for n in names)
    bnn = dit(BayesianFineTuning)
    assert bnn.bayesian_names and not any("norm" in n for n in bnn.bayesian_names)
    assert DiffusionBase  # imported for the reader: the same defaults hold for any DiffusionBase subclass


@pytest.mark.parametrize("model", ["tiny_t2i", "tiny_sdxl", "tiny_dit"])
def test_the_family_puts_its_lora_only_export_back_on_a_plain_denoiser(model, tmp_path):
    def build(**kwargs):
        return tiny_module(DreamBooth, model, **kwargs)

    torch.manual_seed(0)
    module = build(trainable="lora", lora_rank=2, lora_alpha=3)
    perturb(module)
    module.save_pretrained(tmp_path, lora_only=True)
    torch.manual_seed(0)
    plain = build()
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([20, 700])
    inputs = module.family.sample_inputs(["a red star", "a sks circle"], [1, 2], 2)
    cond = module.encode_inputs(module.family.raw_inputs(inputs))
    before = plain.predict(x, t, cond)
    plain.family.load_lora(plain.denoiser, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(plain.predict(x, t, cond), module.predict(x, t, cond), atol=1e-5, rtol=0)
    assert not torch.allclose(before, module.predict(x, t, cond), atol=1e-4)
