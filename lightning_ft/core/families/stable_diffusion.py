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

from collections.abc import Sequence

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.conditions import Condition
from lightning_ft.core.families.base import TEXT, ModelFamily


class StableDiffusion(ModelFamily):
    """SD1.x / SD2.x (epsilon or v-prediction): one text encoder, last hidden state."""

    name = "stable_diffusion"
    kind = TEXT
    pipeline_class = "StableDiffusionPipeline"
    denoiser_argument = "unet"
    lora_prefix = "unet"
    tokenizer_keys = ("tokenizer",)
    encoder_keys = ("text_encoder",)

    def null_inputs(self, n: int) -> list[str]:
        return [""] * n

    def with_null(self, inputs: list[str], drop: torch.Tensor) -> list[str]:
        return ["" if d else s for s, d in zip(inputs, drop.tolist())]

    def tokenize(self, parts: Components, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids (B, L) per tokenizer, padded and truncated to the tokenizer's length as the pipeline does."""
        ids = []
        for key in self.tokenizer_keys:
            tokenizer = getattr(parts, key)
            ids.append(
                tokenizer(
                    list(prompts),
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
            )
        return ids

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample text features from token ids (one tensor per tokenizer, on the encoders' device)."""
        return {"encoder_hidden_states": parts.text_encoder(ids[0])[0]}

    def denoise(self, denoiser, noisy, t, cond: Condition):
        return denoiser(noisy, t, encoder_hidden_states=cond.fields["encoder_hidden_states"]).sample

    def pipeline_options(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


class StableDiffusionXL(StableDiffusion):
    """SDXL: two CLIP encoders (penultimate states, pooled projection), size and crop conditioning."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    pipeline_text_encoders = 2
    tokenizer_keys = ("tokenizer", "tokenizer_2")
    encoder_keys = ("text_encoder", "text_encoder_2")

    def __init__(self, parts: Components):
        super().__init__(parts)
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

    def denoise(self, denoiser, noisy, t, cond):
        added = {"text_embeds": cond.fields["text_embeds"], "time_ids": cond.fields["time_ids"]}
        return denoiser(
            noisy, t, encoder_hidden_states=cond.fields["encoder_hidden_states"], added_cond_kwargs=added
        ).sample

    def pipeline_options(self) -> dict:
        return {
            "force_zeros_for_empty_prompt": self.zeros_for_empty_prompt,
            # Off: an invisible watermark would make the module's and the export's samples differ from the model's.
            "add_watermarker": False,
        }
