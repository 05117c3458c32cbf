"""Qwen-Image-Edit: Qwen-Image that edits a source image, seen by its Qwen2.5-VL encoder and as latent tokens.

Conditions and sampling follow ``QwenImageEditPipeline`` (diffusers/pipelines/qwenimage/pipeline_qwenimage_edit.py).
diffusers has no training script for it: the loss is the Qwen-Image DreamBooth-LoRA script's
(examples/dreambooth/train_dreambooth_lora_qwen_image.py: its latents normalisation, sigma sampling, flow-matching
target) with the edit pipeline's conditioning. Everything of Qwen-Image holds (``qwen_image.QwenImage``: the one-frame
video VAE and its normalisation, 2x2 packed latents, sigma timesteps, the resolution-dependent shift, true CFG with a
negative prompt); what the edit model adds:

- every training image pairs with a source image (``data.source_dir``, or a ``cond_image`` field in the captions file),
  cropped and flipped with it. The pipeline takes sources as PIL images only (its size rule reads ``image.size``), so
  the family's sources (tensors in [0, 1]) become 8-bit PIL images, in training as in sampling;
- the pipeline sizes every source by ``calculate_dimensions(1024 * 1024, width / height)``: about one megapixel at
  the first source's aspect ratio, sides multiples of 32, whatever the target's size (the rule is read from the
  pipeline's module at call time, so training follows it exactly);
- the prompt: ``prompt_template_encode`` (a system turn describing the edit task, the user turn holding
  ``<|vision_start|><|image_pad|><|vision_end|>`` and the prompt) through the pipeline's ``processor``
  (``Qwen2VLProcessor``: it expands the image token to the source's vision tokens and makes its pixel values) with the
  source images as the pipeline passes them for a batch (a list: the images at their own size, which the processor's
  image processor resizes itself); Qwen2.5-VL's last hidden state under the attention mask, each prompt's valid
  states without the first ``prompt_template_encode_start_idx`` (64) tokens, zero-padded to the batch's longest with
  their mask (``_get_qwen_prompt_embeds``: no cut to ``max_sequence_length``, which the edit pipeline ignores); no
  mask when every token is valid (``encode_prompt``). The text cache cannot hold these (they depend on the image):
  they are encoded per batch;
- the source latents: the source resized (PIL, the image processor's Lanczos) to that size, in [-1, 1], the VAE
  posterior's mode as a one-frame clip, ``(z - latents_mean) / latents_std`` (``_encode_vae_image``, argmax);
- the transformer reads the target's packed noisy tokens followed by the source's packed tokens, with ``img_shapes``
  [(1, h/2, w/2), (1, h_source/2, w_source/2)] per sample; its output is cut to the target's tokens
  (``noise_pred[:, : latents.size(1)]``) and unpacked;
- the null input (condition dropout, the negative prompt) is the empty prompt with the same source image, as the
  pipeline encodes its negative prompt with the image;
- sampling passes the sources as ``image`` (the list of PIL images) and asks for samples at the sources' size
  (``height``, ``width``; the pipeline's default is the ~1 Mpx size of the source), with Qwen-Image's true CFG;
- the ``processor`` is part of the model (a family ``frozen_components`` entry: loaded from a folder's
  ``processor/``, built from ``model.components.processor`` (``build_processor``), saved with the export). With
  transformers 5 a ``Qwen2VLProcessor`` cannot be built without torchvision: its ``__init__`` requires a video
  processor, and every video processor needs torchvision (without it, transformers fails resolving the video processor
  class: ``VIDEO_PROCESSOR_MAPPING has no attribute _extra_content``). The edit pipeline passes images only, so
  ``build_processor`` without torchvision builds ``ImageQwen2VLProcessor`` (the same processor without its video
  part, with the PIL image processor); the export writes it as a standard ``Qwen2VLProcessor`` folder (the video
  processor's default settings included). Loading a folder's ``processor/`` (``from_pretrained``: the plain
  diffusers reload, or a pretrained folder) instantiates the video processor and needs torchvision;
- prior preservation is refused with source images (class images have no source; the rule of every editing family),
  and Diff-Tuning (its memory bank is the pretrained model's samples from the null input, and an editing model has no
  sample without a source image).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
from pathlib import Path

import torch
from transformers import Qwen2VLProcessor

from lightning_ft.core.components import Components
from lightning_ft.core.families.base import batch_timesteps, pack_2x2, unpack_2x2
from lightning_ft.core.families.qwen_image import QwenImage
from lightning_ft.core.families.text import TextFamily

_PIPELINE_MODULE = "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit"
#: ``QwenImageEditPipeline.__call__``'s source area (hard-coded there: ``calculate_dimensions(1024 * 1024, ...)``).
PIPELINE_SOURCE_AREA = 1024 * 1024
#: The video processor of the exported ``processor/`` folder when it was built without torchvision (its defaults).
_VIDEO_PROCESSOR = "Qwen2VLVideoProcessor"


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _image_processor_class():
    """transformers' default ``Qwen2VLImageProcessor`` (torchvision) when torchvision is installed, else its PIL
    variant (the same settings and saved config; it resizes with PIL, so its pixel values can differ slightly)."""
    if has_torchvision():
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


class ImageQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor: what ``QwenImageEditPipeline`` uses of it (the prompt with
    images: tokens, vision tokens, pixel values) without torchvision. Its sub-processors are the image processor and
    the tokenizer (transformers reads them from ``__init__``); the family's export saves it as a ``Qwen2VLProcessor``
    folder."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_processor(tokenizer: dict, image_processor: dict | None = None):
    """A ``Qwen2VLProcessor`` built offline: a word-level tokenizer (``tokenizer``: ``build_word_tokenizer``'s
    settings; the template's and vision markers as added tokens) and a ``Qwen2VLImageProcessor`` (``image_processor``:
    its settings, e.g. ``min_pixels`` / ``max_pixels``), with the default video processor; without torchvision, an
    ``ImageQwen2VLProcessor`` (no video processor, the PIL image processor: module docstring)."""
    from lightning_ft.core.tokenizer import build_word_tokenizer

    images = _image_processor_class()(**(image_processor or {}))
    words = build_word_tokenizer(**tokenizer)
    if not has_torchvision():
        return ImageQwen2VLProcessor(image_processor=images, tokenizer=words)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2VLProcessor(image_processor=images, tokenizer=words, video_processor=Qwen2VLVideoProcessor())


def _as_qwen2vl_folder(path: Path) -> None:
    """An ``ImageQwen2VLProcessor``'s export as the standard ``Qwen2VLProcessor`` folder: ``model_index.json`` names
    transformers' class, ``processor/processor_config.json`` its class and the default video processor."""
    index = json.loads((path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config_file = path / "processor" / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["processor_class"] = "Qwen2VLProcessor"
    config.setdefault("video_processor", {"video_processor_type": _VIDEO_PROCESSOR})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def small_sources(area: int = 32 * 32):
    """Within: the pipeline's module sizes sources to ``area`` pixels instead of its hard-coded 1024 x 1024 (its
    ``calculate_dimensions`` wrapped; the family reads it from there, so both follow). For tiny models on CPU (tests
    and debugging), where a 1024 x 1024 source takes seconds per image: no pipeline argument changes that area."""
    module = importlib.import_module(_PIPELINE_MODULE)
    original = module.calculate_dimensions
    module.calculate_dimensions = lambda target_area, ratio: original(area, ratio)
    try:
        yield
    finally:
        module.calculate_dimensions = original


def to_pil(sources: torch.Tensor) -> list:
    """Sources (N, 3, H, W) in [0, 1] as 8-bit PIL images (what the pipeline takes; ``VaeImageProcessor``'s
    rounding)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(sources.detach().float().cpu()))


class QwenImageEdit(QwenImage):
    """Qwen-Image-Edit (module docstring): Qwen-Image with the source image in the VL prompt and as latent tokens."""

    name = "qwen_image_edit"
    pipelines = ("QwenImageEditPipeline",)
    pipeline_class = "QwenImageEditPipeline"
    # refused: Qwen-Image's (Edit-Plus, Edit-Inpaint, image-to-image, ControlNet, Layered), inherited.
    task = "image editing"
    hub_task = "image-to-image"
    needs_source = True
    #: The pipeline's Qwen2VLProcessor: part of the model, loaded, passed to the pipeline and exported.
    frozen_components = ("processor",)
    pipeline_components = (*QwenImage.pipeline_components, "processor")
    #: Python packages loading its export needs (``from_pretrained`` of ``processor/`` builds the video processor).
    reload_requires = ("torchvision",)
    #: Tests and debugging on CPU: the context its tiny models run in (sources at 32 x 32 px, ``small_sources``).
    tiny_context = staticmethod(small_sources)
    #: After Qwen-Image: a bare QwenImageTransformer2DModel built from configs is Qwen-Image (the edit model's has the
    #: same architecture; its folders name QwenImageEditPipeline, a config-built one sets ``model.family``).
    detect_order = QwenImage.detect_order + 1

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        if parts.extras.get("processor") is None:
            raise ValueError("Qwen-Image-Edit needs its processor (Qwen2VLProcessor): model.components.processor, or "
                             "a folder with processor/")  # fmt: skip
        self.processor = parts.extras["processor"]
        from diffusers.image_processor import VaeImageProcessor

        # The pipeline's own (its __init__: the VAE's scale factor x 2, Lanczos resizing of PIL images).
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor(parts) * 2)

    # ---------------------------------------------------------------------------------------------- editing
    @staticmethod
    def source_size(height: int, width: int) -> tuple[int, int]:
        """(height, width) the pipeline resizes a source of that size to: its module's ``calculate_dimensions`` of
        its fixed area at the source's aspect ratio (read at call time)."""
        w, h, _ = importlib.import_module(_PIPELINE_MODULE).calculate_dimensions(PIPELINE_SOURCE_AREA, width / height)
        return h, w

    def encode_sources(self, module, condition, inputs, sources):
        """The prompts encoded with their sources by Qwen2.5-VL, and the source latents (module docstring)."""
        images = to_pil(sources)
        h, w = self.source_size(images[0].size[1], images[0].size[0])
        prompts = list(inputs.prompts) if hasattr(inputs, "prompts") else list(inputs)
        states, mask = self.encode_with_images(module.text_encoder, prompts, images)
        pixels = self.image_processor.preprocess(images, h, w).to(module.device)  # resized (PIL) to h x w, [-1, 1]
        latents = module.encode_images(pixels, sample=False)
        return condition.replace(encoder_hidden_states=states.to(module.device),
                                 encoder_attention_mask=mask.to(module.device), source_latents=latents)  # fmt: skip

    def encode_with_images(self, text_encoder, prompts, images) -> tuple[torch.Tensor, torch.Tensor]:
        """``_get_qwen_prompt_embeds``: the templated prompts with their images through the processor and Qwen2.5-VL;
        each prompt's valid states without the template's first ``drop``, zero-padded to the longest, and the mask."""
        device = next(text_encoder.parameters()).device
        tokens = self.processor(text=[self.template.format(p) for p in prompts], images=images, padding=True,
                                return_tensors="pt").to(device)  # fmt: skip
        out = text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                           pixel_values=tokens.get("pixel_values"), image_grid_thw=tokens.get("image_grid_thw"),
                           output_hidden_states=True)  # fmt: skip
        valid = tokens["attention_mask"].bool()
        kept = [states[v][self.drop :] for states, v in zip(out.hidden_states[-1], valid)]
        length = max(len(s) for s in kept)
        states = torch.stack([torch.nn.functional.pad(s, (0, 0, 0, length - len(s))) for s in kept])
        positions = torch.arange(length, device=states.device)
        return states, torch.stack([positions < len(s) for s in kept]).long()

    def retention_inputs(self, count, prompts=None):
        raise ValueError(
            "Diff-Tuning: the memory bank is sampled from the pretrained model with the null input, and an editing "
            f"model ({self.name}) samples only from a source image: Diff-Tuning does not apply"
        )

    def denoise(self, denoiser, noisy, t, cond):
        b, _, h, w = noisy.shape
        source = cond.fields["source_latents"].to(noisy.dtype)
        sh, sw = source.shape[-2:]
        states, mask = self.context(cond)
        tokens = pack_2x2(noisy)
        out = denoiser(
            hidden_states=torch.cat([tokens, pack_2x2(source)], dim=1),
            timestep=batch_timesteps(t, noisy) / 1000,
            encoder_hidden_states=states,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h // 2, w // 2), (1, sh // 2, sw // 2)]] * b,
        ).sample
        return unpack_2x2(out[:, : tokens.shape[1]], h, w)

    # ------------------------------------------------------------------------------------------- sampling
    def control_call_kwargs(self, module, inputs) -> dict:
        """The pipeline's ``image`` (the sources as a list of 8-bit PIL images, module docstring) and the samples at
        the sources' size (``height``, ``width``: an edit has its source's size, as the training pairs)."""
        if inputs.sources is None:
            raise ValueError(
                f"generate: the {self.name} family is an editing model: give sources (one source image "
                "per sample, (N, 3, H, W) in [0, 1])"
            )
        images = torch.stack(list(inputs.sources))
        h, w = images.shape[-2:]
        return {"image": to_pil(images), "height": h, "width": w}

    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        """True CFG at ``true_cfg_scale`` = guidance with the negative prompt (as Qwen-Image), from the sources."""
        guided = guidance > 1
        out = pipe(
            prompt=list(inputs.prompts),
            negative_prompt=[negative_prompt or ""] * len(inputs) if guided else None,
            true_cfg_scale=guidance,
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            output_type="pt",
            **self.control_call_kwargs(module, inputs),
        ).images
        return out.float().clamp(0, 1)

    def export(self, parts: Components, scheduler, path: Path) -> dict:
        """The pipeline's folder; a processor built without torchvision is saved as a ``Qwen2VLProcessor``'s."""
        recorded = super().export(parts, scheduler, path)
        if isinstance(parts.extras.get("processor"), ImageQwen2VLProcessor):
            _as_qwen2vl_folder(Path(path))
        return recorded

    def describe(self) -> str:
        return f"{self.name} (image editing, Qwen2.5-VL with the source image, source latents)"

    def usage_example(self, prompt: str, settings: str) -> str | None:
        call = TextFamily.usage_example(self, prompt, settings)
        return call.replace("pipe(", "pipe(image=source_image, prompt=", 1)
