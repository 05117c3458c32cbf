"""SDXL: both encoders (penultimate states, pooled), time ids from the data, zeros for the empty prompt, the
pipeline it exports, LoRA-only export for ``StableDiffusionXLPipeline.load_lora_weights``, and folder detection."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb, tiny_components, tiny_module
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from lightning_ft.core import DiffusionBase
from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.methods import DreamBooth

PROMPTS = ["a red star on a gray background", "a sks circle"]


def sdxl(**kwargs):
    return tiny_module(DreamBooth, "tiny_sdxl", **kwargs)


def test_conditions_are_the_pipelines_prompt_embeddings_and_time_ids():
    torch.manual_seed(0)
    module = sdxl().eval()
    pipe = module.build_pipeline()
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    cond = module.encode_prompts(PROMPTS)
    assert module.family.name == "sdxl"
    torch.testing.assert_close(cond.fields["encoder_hidden_states"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.fields["text_embeds"], pooled, rtol=0, atol=1e-6)
    assert cond.fields["encoder_hidden_states"].shape[-1] == 32  # both encoders' 16 features
    # The pipeline's time ids at the native size: original = target = (32, 32), crop (0, 0).
    ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=16)
    assert torch.equal(cond.fields["time_ids"], ids.repeat(2, 1))


def test_training_time_ids_come_from_the_recorded_size_and_crop():
    torch.manual_seed(0)
    module = sdxl().eval()
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32), "prompts": PROMPTS}
    batch.update(original_size=torch.tensor([[40, 48], [32, 32]]), crop_top_left=torch.tensor([[0, 8], [0, 0]]))
    ids = module.encode_conditions(batch).fields["time_ids"]
    assert ids.tolist() == [[40, 48, 0, 8, 32, 32], [32, 32, 0, 0, 32, 32]]
    # ... and they reach the UNet: another original size is another prediction.
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    other = {**batch, "original_size": torch.tensor([[64, 64], [64, 64]])}
    assert not torch.allclose(module.predict(x, t, module.encode_conditions(batch)),
                              module.predict(x, t, module.encode_conditions(other)))  # fmt: skip


def test_the_empty_prompt_is_zeros_as_the_pipelines_unconditional_branch(tmp_path):
    torch.manual_seed(0)
    module = sdxl(condition_dropout=1.0)
    module.train()
    dropped = module.encode_conditions({"pixel_values": torch.zeros(2, 3, 32, 32), "prompts": PROMPTS})
    assert not dropped.fields["encoder_hidden_states"].any() and not dropped.fields["text_embeds"].any()
    null = module.null_condition(2)
    assert not null.fields["encoder_hidden_states"].any() and null.fields["time_ids"].any()
    # A folder whose pipeline turns the zeros off encodes "" like any prompt.
    module.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True
    index["force_zeros_for_empty_prompt"] = False
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    plain = DiffusionBase(pretrained=str(tmp_path), sample_steps=2)
    assert plain.family.name == "sdxl" and plain.null_condition(1).fields["text_embeds"].abs().sum() > 0


def test_lora_only_export_loads_with_load_lora_weights(tmp_path):
    torch.manual_seed(0)
    module = sdxl(trainable="lora", lora_rank=2, lora_alpha=4)
    perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=1.5)
    module.save_pretrained(tmp_path / "lora", lora_only=True)
    torch.manual_seed(0)
    sdxl().save_pretrained(tmp_path / "base")  # the same random base the LoRA started from
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.load_lora_weights(tmp_path / "lora")
    pipe.set_progress_bar_config(disable=True)
    got = module.family.sample(module, pipe, SampleInputs.of(prompts=PROMPTS), [0, 1], 2, 1.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    base_pipe = DiffusionPipeline.from_pretrained(tmp_path / "base")
    base = sdxl().family.sample(module, base_pipe, SampleInputs.of(prompts=PROMPTS), [0, 1], 2, 1.5)
    assert not torch.allclose(base, expected, atol=1e-3)  # the LoRA is what makes the difference


@pytest.mark.parametrize("pipeline", ["PixArtAlphaPipeline", "SanaSprintPipeline"])
def test_folders_of_families_not_supported_yet_are_refused_naming_the_pipeline(tmp_path, pipeline):
    torch.manual_seed(0)
    DiffusionBase(components=tiny_components(), sample_steps=2).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["_class_name"] = pipeline
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(NotImplementedError, match=pipeline):
        DiffusionBase(pretrained=str(tmp_path))


def test_an_unknown_family_name_or_one_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="model.family='sana'"):
        sdxl(family="sana")
    with pytest.raises(ValueError, match="model.family='sd3' does not fit.*'sdxl' here"):
        sdxl(family="sd3")


def test_the_sdxl_config_fragment_builds_with_the_experiments(tmp_path, subject_dir):
    """configs/model/stable_diffusion_xl.yaml merges with an experiment; the tiny SDXL stands in for the hub model."""
    from conftest import REPO

    from lightning_ft.run import main

    data = tmp_path / "data.yaml"
    data.write_text(f"data:\n  init_args:\n    instance_dir: {subject_dir}\n    num_class_images: 0\n")
    cli = main(["--config", str(REPO / "experiments/dreambooth_lora.yaml"),
                "--config", str(REPO / "configs/model/stable_diffusion_xl.yaml"),
                "--config", str(REPO / "configs/model/tiny_sdxl.yaml"), "--config", str(data)], run=False)  # fmt: skip
    assert cli.model.family.name == "sdxl" and cli.model.hparams.lr == 1e-4 and cli.model.hparams.lora_rank == 4
    assert cli.model.hparams.trainable == "lora" and cli.model.hparams.guidance_scale == 5.0


def test_train_text_encoder_trains_both_encoders():
    torch.manual_seed(0)
    module = sdxl(train_text_encoder=True)
    assert all(p.requires_grad for p in module.text_encoder.parameters())
    assert all(p.requires_grad for p in module.text_encoder_2.parameters())
    assert not any(p.requires_grad for p in sdxl().text_encoder_2.parameters())


def test_time_ids_of_a_bucketed_batch_are_its_images_size_crop_and_bucket(tmp_path):
    """An aspect bucket's batch: time ids = (original h, w) + (crop top, left) + (bucket h, w), as diffusers' SDXL
    scripts' ``compute_time_ids`` builds them from the sizes they record."""
    from PIL import Image

    from lightning_ft.data import LimitedDataModule

    folder = tmp_path / "wide"
    folder.mkdir()
    for i, size in enumerate([(96, 32), (120, 40)]):
        Image.new("RGB", size, (50 * i, 80, 120)).save(folder / f"w{i}.png")
    data = LimitedDataModule(instance_dir=str(folder), instance_prompt="a sks star", resolution=32, aspect_buckets=True,
                             bucket_step=8, batch_size=2, repeats=1)  # fmt: skip
    module = sdxl().eval()
    data.check_inputs(module)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    h, w = batch["pixel_values"].shape[-2:]
    assert (w, h) == (48, 16)  # both 3:1: the 3:1 bucket of about 32 x 32 pixels in steps of 8
    ids = module.encode_conditions(batch).fields["time_ids"]
    for row, original, crop in zip(ids.tolist(), batch["original_size"].tolist(), batch["crop_top_left"].tolist()):
        assert row == [*original, *crop, h, w]
    assert sorted(tuple(o) for o in batch["original_size"].tolist()) == [(32, 96), (40, 120)]
