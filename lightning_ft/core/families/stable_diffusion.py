"""Text-to-image UNet families: Stable Diffusion 1.x/2.x and SDXL.

SD1.x/2.x: one CLIP text encoder, its last hidden state as the cross-attention context (``StableDiffusionPipeline``).

SDXL (as ``StableDiffusionXLPipeline`` and diffusers' SDXL training scripts):
- the context is the penultimate hidden states of both CLIP encoders, concatenated on the feature axis;
- the pooled output (``text_embeds``) is the second encoder's projected output;
- ``time_ids`` = original size (h, w) + crop top-left (y, x) + target size (h, w) of each image, which the data
  module records (images without them: original = target, crop (0, 0), as the pipeline's defaults);
- the empty prompt is encoded as zeros (context and pooled) when the pipeline's ``force_zeros_for_empty_prompt`` is
  on (its default): the pipeline's unconditional branch is zeros, so condition dropout, Diff-Tuning's retention
  images and ANL's base condition train the branch that guidance will use.
"""

from __future__ import annotations

import math

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.conditions import Condition
from lightning_ft.core.families.text import TextFamily

#: Image-to-image variants of these families: same weights, another task; refused until that task is supported.
_IMAGE_TASK = "it conditions on an input image, which lightning-ft does not train yet"
#: A ControlNet pipeline folder (a base model and a ControlNet, e.g. an export of ``trainable: controlnet``).
_CONTROLNET_FOLDER = (
    "a ControlNet pipeline folder: give its base model as model.pretrained, and to train the ControlNet further "
    "model.trainable=controlnet with model.controlnet=<folder>/controlnet"
)
#: ``ControlNetModel``'s conditioning-embedding widths (diffusers' default for an 8x VAE); its depth follows the VAE.
_CONDITIONING_CHANNELS = (16, 32, 96, 256)


class ClipUNetFamily(TextFamily):
    """What SD1.x/2.x and SDXL share: a ``UNet2DConditionModel`` with CLIP text features as cross-attention context,
    LoRA in diffusers' ``unet`` layout. A UNet whose input has other channels than its output (an inpainting UNet's
    latents + mask + masked image, a depth-to-image UNet) is refused: it needs an input image."""

    denoiser_argument = "unet"
    lora_prefix = "unet"
    #: ``save_pretrained(lora_format="kohya")`` writes its LoRA under the UNet's diffusers names
    #: (``lightning_ft.core.lora_formats.unet_to_kohya``), as sd-scripts does and ComfyUI / A1111 read.
    kohya_lora = "unet"
    fsdp_blocks = ("diffusers.models.attention:BasicTransformerBlock",)

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        config = parts.denoiser.config
        if config.in_channels != config.out_channels:
            raise NotImplementedError(
                f"model: this {type(parts.denoiser).__name__} takes {config.in_channels} input channels for "
                f"{config.out_channels} output channels: an inpainting or image-conditioned UNet, which {self.name} "
                "does not train yet"
            )

    def added_cond_kwargs(self, cond: Condition) -> dict:
        """The UNet's (and its ControlNet's) extra conditioning arguments (SDXL's pooled text and time ids)."""
        return {}

    def denoise(self, denoiser, noisy, t, cond: Condition, **residuals):
        return denoiser(
            noisy, t, encoder_hidden_states=cond.fields["encoder_hidden_states"], **self.added_cond_kwargs(cond),
            **residuals,
        ).sample  # fmt: skip

    # ---------------------------------------------------------------------------------------------- ControlNet
    def make_controlnet(self, parts: Components, path: str | None = None):
        """``ControlNetModel.from_unet`` of the denoiser (diffusers' ``train_controlnet*.py``: the UNet's encoder
        copied, zero convolutions out), with a conditioning embedding that downsamples the control image by the
        VAE's factor (diffusers' default widths, one stride-2 stage per factor of 2); or ``path``'s ControlNet."""
        from diffusers import ControlNetModel

        if path:
            return ControlNetModel.from_pretrained(path)
        stages = int(math.log2(self.vae_scale_factor(parts)))
        channels = (_CONDITIONING_CHANNELS + (_CONDITIONING_CHANNELS[-1],) * stages)[: stages + 1]
        return ControlNetModel.from_unet(parts.denoiser, conditioning_embedding_out_channels=channels)

    def control_residuals(self, controlnet, noisy, t, cond: Condition) -> dict:
        """As diffusers' ``train_controlnet.py``: the ControlNet reads the noisy latents, the timesteps, the text
        context and the control image; its residuals go into the UNet's down and mid blocks (scale 1)."""
        down, mid = controlnet(
            noisy, t, encoder_hidden_states=cond.fields["encoder_hidden_states"],
            controlnet_cond=cond.fields["controlnet_cond"].to(noisy.dtype), return_dict=False,
            **self.added_cond_kwargs(cond),
        )  # fmt: skip
        return {"down_block_additional_residuals": list(down), "mid_block_additional_residual": mid}


class StableDiffusion(ClipUNetFamily):
    """SD1.x / SD2.x (epsilon or v-prediction): one text encoder, last hidden state."""

    name = "stable_diffusion"
    pipelines = ("StableDiffusionPipeline",)
    pipeline_class = "StableDiffusionPipeline"
    refused = {
        "StableDiffusionInpaintPipeline": "inpainting (a 9-channel UNet) is not trained by lightning-ft yet",
        "StableDiffusionImg2ImgPipeline": _IMAGE_TASK,
        "StableDiffusionDepth2ImgPipeline": _IMAGE_TASK,
        "StableDiffusionInstructPix2PixPipeline": _IMAGE_TASK,
        "StableDiffusionUpscalePipeline": _IMAGE_TASK,
        "StableDiffusionControlNetPipeline": _CONTROLNET_FOLDER,
    }
    controlnet_pipeline = "StableDiffusionControlNetPipeline"
    detect_order = 60

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return (
            type(parts.denoiser).__name__ == "UNet2DConditionModel"
            and parts.text_encoder is not None
            and getattr(parts.denoiser.config, "addition_embed_type", None) != "text_time"
        )

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": parts.text_encoder(ids[0])[0]}

    def pipeline_options(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


class StableDiffusionXL(ClipUNetFamily):
    """SDXL: two CLIP encoders (penultimate states, pooled projection), size and crop conditioning."""

    name = "sdxl"
    pipelines = ("StableDiffusionXLPipeline",)
    pipeline_class = "StableDiffusionXLPipeline"
    refused = {
        "StableDiffusionXLInpaintPipeline": "inpainting is not trained by lightning-ft yet",
        "StableDiffusionXLImg2ImgPipeline": _IMAGE_TASK,
        "StableDiffusionXLInstructPix2PixPipeline": _IMAGE_TASK,
        "StableDiffusionXLControlNetPipeline": _CONTROLNET_FOLDER,
    }
    controlnet_pipeline = "StableDiffusionXLControlNetPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    detect_order = 50

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return (
            type(parts.denoiser).__name__ == "UNet2DConditionModel"
            and parts.text_encoder_2 is not None
            and getattr(parts.denoiser.config, "addition_embed_type", None) == "text_time"
        )

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        self.zeros_for_empty_prompt = bool(self.settings.get("force_zeros_for_empty_prompt", True))

    def encode_ids(self, parts, ids):
        states, pooled = [], None
        for encoder, tokens in zip((parts.text_encoder, parts.text_encoder_2), ids):
            out = encoder(tokens, output_hidden_states=True)
            # The pipeline keeps the pooled output of the last encoder that has one (CLIPTextModelWithProjection).
            if out[0].ndim == 2:
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled}

    def encode(self, module, inputs, n, geometry):
        fields = module.text_features(inputs)
        if self.zeros_for_empty_prompt:
            empty = torch.tensor([not p for p in inputs], device=fields["text_embeds"].device)
            if empty.any():
                fields = {k: torch.where(empty.view(-1, *([1] * (v.ndim - 1))), 0.0, v) for k, v in fields.items()}
        time_ids = torch.cat([geometry["original_size"], geometry["crop_top_left"], geometry["target_size"]], dim=1)
        fields["time_ids"] = time_ids.to(fields["text_embeds"])
        return Condition(fields, n)

    def added_cond_kwargs(self, cond):
        return {"added_cond_kwargs": {"text_embeds": cond.fields["text_embeds"], "time_ids": cond.fields["time_ids"]}}

    def pipeline_options(self) -> dict:
        return {
            "force_zeros_for_empty_prompt": self.zeros_for_empty_prompt,
            # Off: an invisible watermark would make the module's and the export's samples differ from the model's.
            "add_watermarker": False,
        }
