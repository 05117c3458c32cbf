"""Qwen-Image-Edit: the condition (Qwen2.5-VL states of the templated prompt with the source image, the source
latents, ``img_shapes``) is what ``QwenImageEditPipeline`` gives its transformer; the training loss equals the
Qwen-Image DreamBooth-LoRA script's (``train_dreambooth_lora_qwen_image.py``; diffusers has no Qwen-Image-Edit script)
with the edit pipeline's conditioning, on the same batch, noise and timesteps (with ``model.flow_shift: 1.0``); the
full and LoRA-only exports sample the module's images in plain diffusers given the same sources; what does not apply
is refused by name.

The pipeline sizes every source to about 1024 x 1024 (``calculate_dimensions(1024 * 1024, ratio)``, hard-coded in its
``__call__``; no argument changes it). On CPU that makes a tiny model's test minutes long, so these tests shrink the
area of that one function to 32 x 32 in the pipeline's module (the family's ``tiny_context``): the pipeline and the
family (which reads the function from that module at call time) both follow it.
``test_sources_are_sized_as_the_pipeline_sizes_them`` checks the real rule.

Without torchvision the tiny processor is the family's ``ImageQwen2VLProcessor`` (transformers 5 builds no
``Qwen2VLProcessor`` without it): everything runs but the reloads of an export's ``processor/`` (plain diffusers, or the
folder as ``model.pretrained``), which instantiate its video processor and so need torchvision: those parts skip."""

from __future__ import annotations

import json

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_pipeline
import family_checks as checks
import pytest
import torch
from conftest import REPO, perturb, tiny_backbones, tiny_components, tiny_module
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from diffusers.training_utils import compute_loss_weighting_for_sd3
from transformers import Qwen2VLProcessor

from lightning_ft.core.families import detect_family, family_for_pipeline, fsdp_block_classes
from lightning_ft.core.families.base import pack_2x2
from lightning_ft.core.families.qwen_image import QwenImage
from lightning_ft.core.families.qwen_image_edit import ImageQwen2VLProcessor, QwenImageEdit, has_torchvision, to_pil
from lightning_ft.methods import AdapterAttentionFineTuning, BayesianFineTuning, DiffTuning, DreamBooth

PROMPTS = ["a sks star on a gray background", "a red circle"]
#: Why the reload of an export's processor/ is skipped without torchvision.
NEEDS_TORCHVISION = ("loading a Qwen2VLProcessor folder instantiates its video processor, which needs torchvision "
                     "(transformers 5); not installed")  # fmt: skip
_CALCULATE = edit_pipeline.calculate_dimensions


@pytest.fixture(autouse=True)
def small_sources():
    with QwenImageEdit.tiny_context():  # the pipeline's calculate_dimensions at 32 x 32 px
        yield


def qwen_edit(cls=DreamBooth, **kwargs):
    return tiny_module(cls, "tiny_qwen_image_edit", family="qwen_image_edit", **kwargs)


def pipeline_call(pipe, prompts, images, seeds, guidance):
    """A plain ``QwenImageEditPipeline`` call: PIL sources, true CFG with the empty negative prompt."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(image=to_pil(images), prompt=prompts, negative_prompt=[""] * len(prompts), true_cfg_scale=guidance,
                num_inference_steps=2, height=32, width=32, generator=[torch.Generator().manual_seed(s) for s in seeds],
                output_type="pt").images  # fmt: skip


def transformer_inputs(pipe, prompts, images, guidance=1.0) -> list[dict]:
    """What the pipeline gives its transformer, call by call (keyword arguments)."""
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    try:
        pipeline_call(pipe, prompts, images, [0, 1], guidance)
    finally:
        handle.remove()
    return calls


def test_conditions_and_transformer_inputs_are_the_pipelines():
    torch.manual_seed(0)
    module = qwen_edit().eval()
    perturb(module)
    pipe = module.build_pipeline()
    assert module.family.name == "qwen_image_edit" and type(pipe).__name__ == "QwenImageEditPipeline"
    assert isinstance(pipe.processor, Qwen2VLProcessor)
    assert isinstance(pipe.processor, ImageQwen2VLProcessor) != has_torchvision()
    images = checks.sources()
    cond = module.with_source(module.encode_prompts(PROMPTS), PROMPTS, images)
    # encode_prompt with the image (the pipeline passes a batch's sources as the list of PIL images).
    embeds, mask = pipe.encode_prompt(PROMPTS, image=to_pil(images))
    states, own_mask = QwenImageEdit.context(cond)
    torch.testing.assert_close(states, embeds, rtol=0, atol=1e-6)
    assert (own_mask is None) == (mask is None) and (mask is None or torch.equal(own_mask, mask))
    assert mask is not None  # prompts of different lengths: padded, as the pipeline pads them
    # The vision tokens are in the sequence: another source, other states.
    other = module.with_source(module.encode_prompts(PROMPTS), PROMPTS, checks.sources(seed=4))
    assert not torch.allclose(other.fields["encoder_hidden_states"], cond.fields["encoder_hidden_states"])
    # prepare_latents' image latents of the pipeline's preprocessed (resized) sources.
    processed = pipe.image_processor.preprocess(to_pil(images), 32, 32).unsqueeze(2)
    _, image_latents = pipe.prepare_latents(processed, 2, 4, 32, 32, torch.float32, "cpu",
                                            torch.Generator().manual_seed(0))  # fmt: skip
    own = cond.fields["source_latents"]
    assert own.shape == (2, 4, 8, 8)
    torch.testing.assert_close(pack_2x2(own), image_latents, rtol=0, atol=1e-5)
    # What the pipeline's loop gives the transformer at its first step: the same context, the target's tokens then
    # the source's, img_shapes of both. The family's predict on those inputs is the pipeline's (cut) prediction.
    first = transformer_inputs(pipe, PROMPTS, images)[0]
    torch.testing.assert_close(first["encoder_hidden_states"], states, rtol=0, atol=1e-6)
    torch.testing.assert_close(first["encoder_hidden_states_mask"], own_mask)
    assert first["img_shapes"] == [[(1, 4, 4), (1, 4, 4)]] * 2
    target, source = first["hidden_states"][:, :16], first["hidden_states"][:, 16:]
    torch.testing.assert_close(source, pack_2x2(own), rtol=0, atol=1e-5)
    with torch.no_grad():
        out = module.denoiser(**first)[0][:, :16]
        x = edit_pipeline.QwenImageEditPipeline._unpack_latents(target, 32, 32, 4)[:, :, 0]
        got = module.family.denoise(module.denoiser, x, first["timestep"] * 1000, cond)
        torch.testing.assert_close(pack_2x2(got), out, rtol=0, atol=1e-5)
    # Condition dropout keeps the source: the null input is the empty prompt with the same image (the pipeline's
    # negative prompt, encoded with the image).
    module.train()
    module.hparams.condition_dropout = 1.0
    batch = {"pixel_values": images * 2 - 1, "prompts": PROMPTS, "source_values": images}
    dropped = module.encode_conditions(batch)
    null = pipe.encode_prompt(["", ""], image=to_pil(images))[0]
    torch.testing.assert_close(QwenImageEdit.context(dropped)[0], null, rtol=0, atol=1e-6)
    torch.testing.assert_close(dropped.fields["source_latents"], own, rtol=0, atol=1e-6)
    module.eval()
    negative = transformer_inputs(pipe, PROMPTS, images, guidance=2.0)[1]  # the first step's unconditional call
    torch.testing.assert_close(negative["encoder_hidden_states"], null, rtol=0, atol=1e-6)


def test_sources_are_sized_as_the_pipeline_sizes_them(monkeypatch):
    monkeypatch.setattr(edit_pipeline, "calculate_dimensions", _CALCULATE)  # the real rule: about 1 Mpx
    assert QwenImageEdit.source_size(32, 32) == (1024, 1024)
    w, h, _ = _CALCULATE(1024 * 1024, 48 / 32)
    assert QwenImageEdit.source_size(32, 48) == (h, w) and h % 32 == 0 and w % 32 == 0 and h < w
    with QwenImageEdit.tiny_context():
        assert QwenImageEdit.source_size(64, 48) == (32, 32)  # what these tests run at
    assert QwenImageEdit.source_size(32, 32) == (1024, 1024)


def script_loss(module, batch, x0, noise, indices):
    """train_dreambooth_lora_qwen_image.py's loss (no prior preservation), step by step, with the edit pipeline's
    conditioning: ``encode_prompt`` with the source images, ``prepare_latents``' image latents packed after the
    target's tokens, ``img_shapes`` of both, the prediction cut to the target's tokens. ``x0``: the script's
    normalised target latents; ``indices``: its schedule positions ((u * T).long())."""
    vae, transformer = module.vae, module.denoiser
    pipe = module.build_pipeline()
    # The script: FlowMatchEulerDiscreteScheduler.from_pretrained(..., subfolder="scheduler", shift=3.0).
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(module.noise_scheduler.config, shift=3.0)
    images = to_pil(batch["source_values"])
    embeds, mask = pipe.encode_prompt(batch["prompts"], image=images)
    processed = pipe.image_processor.preprocess(images, 32, 32).unsqueeze(2)
    _, image_latents = pipe.prepare_latents(processed, len(images), 4, 32, 32, torch.float32, "cpu", None)
    vae_scale_factor = 2 ** len(vae.temperal_downsample)
    model_input = x0.unsqueeze(2)  # (B, C, 1, H, W), (z - latents_mean) * (1 / latents_std)
    noise = noise.unsqueeze(2)
    bsz = model_input.shape[0]
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1, 1)
    assert torch.allclose(sigmas.flatten(), 1 - indices / 1000)  # shift=3.0 is ignored: use_dynamic_shifting
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    latent_height, latent_width = model_input.shape[3], model_input.shape[4]
    source_height, source_width = (side // vae_scale_factor for side in processed.shape[-2:])
    img_shapes = [[(1, latent_height // 2, latent_width // 2), (1, source_height // 2, source_width // 2)]] * bsz
    noisy_model_input = noisy_model_input.permute(0, 2, 1, 3, 4)
    packed = QwenImageEditPipeline._pack_latents(noisy_model_input, bsz, model_input.shape[1], latent_height,
                                                 latent_width)  # fmt: skip
    model_pred = transformer(hidden_states=torch.cat([packed, image_latents], dim=1), encoder_hidden_states=embeds,
                             encoder_hidden_states_mask=mask, timestep=timesteps / 1000, img_shapes=img_shapes,
                             return_dict=False)[0]  # fmt: skip
    model_pred = model_pred[:, : packed.size(1)]
    model_pred = QwenImageEditPipeline._unpack_latents(
        model_pred, latent_height * vae_scale_factor, latent_width * vae_scale_factor, vae_scale_factor
    )
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
    return checks.script_mse(model_pred, noise - model_input, weighting, prior=False, chunk_weighting=True)


def test_training_loss_is_the_scripts_with_flow_shift_1_and_the_default_shift_is_the_pipelines():
    checks.check_edit_loss_at_both_shifts(qwen_edit, script_loss, PROMPTS, (4, 8, 8))


def test_export_samples_the_modules_images_in_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    module = qwen_edit()
    perturb(module)
    images = checks.sources()
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0, sources=images)
    assert expected.shape == (2, 3, 32, 32)
    other = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0, sources=checks.sources(seed=9))
    assert not torch.allclose(other, expected, atol=1e-4)
    module.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    # A standard Qwen2VLProcessor folder (with or without torchvision at export): its class, its video processor.
    processor = json.loads((tmp_path / "processor" / "processor_config.json").read_text())
    assert processor["processor_class"] == "Qwen2VLProcessor"
    assert processor["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert processor["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    if not has_torchvision():
        pytest.skip(f"the reload: {NEEDS_TORCHVISION}")
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe).__name__ == "QwenImageEditPipeline"
    torch.testing.assert_close(pipeline_call(pipe, PROMPTS, images, [0, 1], 2.0).float(), expected, rtol=0,
                               atol=1e-5)  # fmt: skip
    assert not torch.allclose(expected[0], expected[1])
    # The folder reloads as the qwen_image_edit family, processor included, to the same samples.
    again = DreamBooth(pretrained=str(tmp_path), sample_steps=2, sample_resolution=32)
    assert again.family.name == "qwen_image_edit" and type(again.processor).__name__ == "Qwen2VLProcessor"
    torch.testing.assert_close(again.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=2.0, sources=images),
                               expected, rtol=0, atol=1e-5)  # fmt: skip


def test_lora_only_export_loads_with_load_lora_weights(tmp_path):
    torch.manual_seed(0)
    module = qwen_edit(trainable="lora", lora_rank=2, lora_alpha=4)
    perturb(module)
    images = checks.sources()

    def base():
        pipe = qwen_edit().build_pipeline()  # a plain QwenImageEditPipeline of the same random base
        assert type(pipe) is QwenImageEditPipeline
        return pipe

    sample = lambda pipe: pipeline_call(pipe, PROMPTS, images, [0, 1], 2.0)
    checks.check_lora_only_export(module, tmp_path, base, PROMPTS, sample=sample, differs=1e-4, sources=images)
    assert checks.lora_targets(module) == {"to_k", "to_q", "to_v", "to_out.0"}  # the Qwen-Image script's default


def test_variant_pipelines_and_what_does_not_apply_are_refused_by_name(tmp_path):
    torch.manual_seed(0)
    module = qwen_edit()
    # A bare QwenImageTransformer2DModel is Qwen-Image; the edit model is chosen by its pipeline or model.family.
    assert detect_family(module.parts) == "qwen_image"
    assert (
        family_for_pipeline("QwenImageEditPipeline") is QwenImageEdit
        and "QwenImageEditPipeline" not in QwenImage.refused
    )
    module.save_pretrained(tmp_path)
    for name, reason in {"QwenImageEditPlusPipeline": "several source images",
                         "QwenImageEditInpaintPipeline": "inpaints"}.items():  # fmt: skip
        checks.check_refused_by_name(tmp_path, name, f"{name}.*{reason}", sample_steps=2)
    with pytest.raises(ValueError, match="qwen_image_edit family is an editing model: give sources"):
        module.generate(prompts=PROMPTS, seeds=[0, 1])
    with pytest.raises(ValueError, match="editing model: its batches need source images"):
        module.encode_conditions({"pixel_values": checks.sources() * 2 - 1, "prompts": PROMPTS})
    qwen = tiny_module(DreamBooth, "tiny_qwen_image")
    with pytest.raises(ValueError, match="qwen_image family is not an editing model.*qwen_image_edit"):
        qwen.generate(prompts=PROMPTS, seeds=[0, 1], sources=checks.sources())
    with pytest.raises(ValueError, match="needs its processor"):
        DreamBooth(
            components={**tiny_components("tiny_qwen_image_edit"), "processor": None},
            family="qwen_image_edit",
            backbones=tiny_backbones("tiny_qwen_image_edit"),
            sample_resolution=32,
        )
    with pytest.raises(ValueError, match="Diff-Tuning.*editing model.*does not apply"):
        qwen_edit(DiffTuning, memory_size=2)


def test_bnn_fsdp_and_a3fta_find_their_layers():
    torch.manual_seed(0)
    module = qwen_edit(BayesianFineTuning)
    parts = {n.split(".", 2)[2] for n in module.bayesian_names}
    assert {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2"} <= parts
    assert not any("_mod" in p or "add_" in p or "txt_mlp" in p or "norm" in p for p in parts)
    assert QwenImageTransformerBlock in fsdp_block_classes()
    a3fta = qwen_edit(AdapterAttentionFineTuning)
    adapted = [n for n, _ in a3fta.denoiser.named_modules() if n.endswith(".attn")]
    assert len(adapted) == 2 and a3fta.family.attention_names == ("attn",)
    assert (REPO / "configs/model/tiny_qwen_image_edit.yaml").is_file()
