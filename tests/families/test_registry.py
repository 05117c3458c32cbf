"""The family registry: families register themselves, folders are chosen by their pipeline, what cannot be trained
correctly is refused by name (an unknown component, an inpainting UNet, an editing pipeline), an unknown pipeline is
trained as the family its parts match with a warning naming both; ``SampleInputs`` is what samples are asked with."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_components, tiny_module

from lightning_ft.core import DiffusionBase
from lightning_ft.core.families import REGISTRY, ModelFamily, detect_family, family_for_pipeline
from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.core.families.stable_diffusion import StableDiffusion


def _saved(tmp_path, model: str = "tiny_t2i", **kwargs):
    torch.manual_seed(0)
    tiny_module(model=model, **kwargs).save_pretrained(tmp_path)
    return tmp_path


def _relabel(folder, pipeline: str, **extra) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name=pipeline, **extra)
    (folder / "model_index.json").write_text(json.dumps(index))


def test_a_subclass_registers_itself_and_is_chosen_by_its_pipeline():
    class Mine(StableDiffusion):
        name = "test_mine"
        pipelines = ("MyTestPipeline",)
        refused = {"MyTestEditPipeline": "editing is not done"}

    try:
        assert REGISTRY["test_mine"] is Mine and family_for_pipeline("MyTestPipeline") is Mine
        with pytest.raises(NotImplementedError, match="MyTestEditPipeline.*editing is not done.*MyTestPipeline"):
            family_for_pipeline("MyTestEditPipeline")
        with pytest.raises(TypeError, match="registered twice"):
            type("Again", (StableDiffusion,), {"name": "test_mine"})
    finally:
        REGISTRY.pop("test_mine")
    # A base without a name (a shared base such as TextFamily) is not a family.
    assert all(cls.name for cls in REGISTRY.values())
    assert ModelFamily not in REGISTRY.values()


def test_every_family_declares_what_is_model_specific():
    for cls in REGISTRY.values():
        assert cls.pipelines, cls
        assert cls.processes and set(cls.processes) <= {"ddpm", "flow_matching"}, cls
        assert all(":" in block for block in cls.fsdp_blocks), cls
        assert not set(cls.pipelines) & set(cls.refused), cls


def test_an_unknown_component_is_refused_by_name(tmp_path):
    """An LDM folder's ``vqvae`` is its autoencoder: dropping it would train pixels and export without it."""
    folder = _saved(tmp_path)
    _relabel(folder, "LDMTextToImagePipeline", vqvae=["diffusers", "VQModel"])
    with pytest.raises(ValueError, match="vqvae \\(VQModel\\).*refused"):
        DiffusionBase(pretrained=str(folder))


def test_an_inpainting_unet_is_refused_by_name(tmp_path):
    components = tiny_components("tiny_t2i")
    denoiser = components["denoiser"]
    config = {**denoiser["config"], "in_channels": 2 * denoiser["config"]["in_channels"] + 1}
    with pytest.raises(NotImplementedError, match="inpainting"):
        DiffusionBase(components={**components, "denoiser": {**denoiser, "config": config}}, sample_steps=2)
    folder = _saved(tmp_path)
    _relabel(folder, "StableDiffusionInpaintPipeline")
    with pytest.raises(NotImplementedError, match="StableDiffusionInpaintPipeline"):
        DiffusionBase(pretrained=str(folder))


def test_flux_editing_folders_are_refused_not_trained_as_flux(tmp_path):
    folder = _saved(tmp_path, "tiny_flux", sample_resolution=32)
    for pipeline in ("FluxFillPipeline", "FluxControlPipeline"):  # FluxKontextPipeline: the flux_kontext family
        _relabel(folder, pipeline)
        with pytest.raises(NotImplementedError, match=f"{pipeline}.*reference or control image.*FluxPipeline"):
            DiffusionBase(pretrained=str(folder))


def test_an_unknown_pipeline_is_trained_as_its_parts_with_a_warning_naming_both(tmp_path):
    folder = _saved(tmp_path)
    _relabel(folder, "MyOwnStableDiffusionPipeline")
    with pytest.warns(UserWarning, match="MyOwnStableDiffusionPipeline.*'stable_diffusion'.*StableDiffusionPipeline"):
        module = DiffusionBase(pretrained=str(folder))
    assert module.family.name == "stable_diffusion"


def test_an_unknown_pipeline_no_family_matches_is_refused_naming_it_and_every_supported_one():
    from diffusers import UNet2DModel

    from lightning_ft.core.components import Components

    parts = Components(
        denoiser=torch.nn.Linear(2, 2), scheduler=None, pipeline_class="SomeVideoPipeline",
        text_encoders={"text_encoder": torch.nn.Linear(2, 2)}, tokenizers={"tokenizer": object()},
    )  # fmt: skip
    with pytest.raises(NotImplementedError) as error:
        detect_family(parts)
    message = str(error.value)
    assert "SomeVideoPipeline" in message and "Linear" in message
    for cls in REGISTRY.values():  # every family's pipelines, not only the UNet ones
        assert all(p in message for p in cls.pipelines)
    unconditional = Components(denoiser=UNet2DModel(sample_size=8, block_out_channels=(4, 8), norm_num_groups=4,
                                                    down_block_types=("DownBlock2D",) * 2,
                                                    up_block_types=("UpBlock2D",) * 2), scheduler=None)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pipeline named: nothing to warn about
        assert detect_family(unconditional) == "unconditional"


def test_text_encoders_are_a_mapping_of_any_number():
    module = tiny_module(model="tiny_sd3")
    parts = module.parts
    assert sorted(parts.text_encoders) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert parts.text_encoder_3 is module.text_encoder_3 and parts.tokenizer_9 is None
    assert set(parts.tokenizers) == {"tokenizer", "tokenizer_2", "tokenizer_3"}
    # Checkpoints hold each encoder under its component key, as before the mapping.
    assert any(k.startswith("text_encoder_3.") for k in module.state_dict())


def test_sample_inputs_are_what_the_family_reads():
    sd, dit = tiny_module(), tiny_module(model="tiny_dit")
    text = sd.family.sample_inputs(["a", "b"], [1, 2], 2)
    assert text.prompts == ("a", "b") and text.labels is None and text.generate_kwargs() == {"prompts": ["a", "b"]}
    labels = dit.family.sample_inputs(["a", "b"], [1, 2], 2)
    assert labels.labels == (1, 2) and labels.texts() == ["class 1", "class 2"]
    with pytest.raises(ValueError, match="SampleGridLogger.*prompts"):
        sd.family.sample_inputs(None, [1], 1, where="SampleGridLogger")
    assert not sd.family.sample_inputs(None, None, 3, required=False).conditional
    rows = SampleInputs.of(prompts=["x", "y"])
    assert rows.each(2).prompts == ("x", "x", "y", "y") and rows.cycle(3).prompts == ("x", "y", "x")
    assert rows.take([1]).prompts == ("y",) and len(SampleInputs(4)[1:3]) == 2
    with pytest.raises(ValueError, match="3 prompts for 2"):
        SampleInputs(2, prompts=("a", "b", "c"))
