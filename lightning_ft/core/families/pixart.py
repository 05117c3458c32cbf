"""PixArt-Sigma: a T5-conditioned latent transformer (``PixArtTransformer2DModel``) on the DDPM process.

Everything follows ``PixArtSigmaPipeline`` (diffusers/pipelines/pixart_alpha/pipeline_pixart_sigma.py), so that the
conditions trained on are the ones the pipeline samples with, and PixArt's own LoRA script
(PixArt-alpha/PixArt-sigma, train_scripts/train_pixart_lora_hf.py) where the pipeline says nothing about training:

- prompts are lower-cased and stripped (``_text_preprocessing`` with ``clean_caption=False``, ``encode_prompt``'s
  default; the sampling here passes ``clean_caption=False`` too, so training and sampling read the same text);
- tokenised with ``padding="max_length"``, ``truncation=True`` to ``max_sequence_length``: the pipeline's default
  (300 for Sigma, read from ``PixArtSigmaPipeline.__call__``), or the tokenizer's ``model_max_length`` when that is
  shorter (the tiny word tokenizers of the tests; a T5 tokenizer declares 512 or nothing);
- the T5 encoder's last hidden state, computed with the tokenizer's attention mask, is ``encoder_hidden_states``;
  the same mask is ``encoder_attention_mask`` (the transformer turns it into a -10000 bias on padded tokens): both
  are per-sample ``Condition`` fields (the mask stays an integer tensor; ``Condition.cat`` / ``where`` keep it);
- the unconditional branch is the empty prompt ``""`` *encoded* (a T5 state and its mask), as the pipeline encodes
  its ``negative_prompt`` default, not zeros;
- the transformer is called with ``timestep`` = the integer timesteps (the pipeline expands them to the batch),
  ``added_cond_kwargs={"resolution": None, "aspect_ratio": None}`` (Sigma has no micro-conditions: a transformer
  built with ``use_additional_conditions`` is refused); it predicts 2 x the latent channels (learned sigma), and
  ``DiffusionBase.predict`` keeps the first half, as the pipeline's ``noise_pred.chunk(2, dim=1)[0]``;
- sampling and export go through ``PixArtSigmaPipeline`` built from the components, with
  ``use_resolution_binning=False``: at the native square size binning maps the size onto itself (a no-op), and for
  sample sizes outside its tables (the tiny models') the pipeline would raise;
- LoRA: diffusers has no PixArt LoRA loader (no ``load_lora_weights`` on the pipeline, no ``add_adapter`` on the
  transformer), so LoRA goes in by PEFT injection and ``ModelFamily.save_lora`` writes PEFT's adapter folder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.conditions import Condition
from lightning_ft.core.families.base import (
    TRANSFORMER_BNN_EXCLUDE,
    TRANSFORMER_BNN_INCLUDE,
    batch_timesteps,
    pipeline_max_sequence_length,
)
from lightning_ft.core.families.text import TextFamily

#: PixArt's micro-conditions, none for Sigma (``added_cond_kwargs`` of PixArtSigmaPipeline.__call__).
NO_MICRO_CONDITIONS = {"resolution": None, "aspect_ratio": None}


class PixArtSigma(TextFamily):
    """PixArt-Sigma (module docstring): T5 states and mask, the encoded empty prompt, learned sigma, DDPM."""

    name = "pixart_sigma"
    pipelines = ("PixArtSigmaPipeline",)
    refused = {
        # Not the same as Sigma: 120 tokens, and its 1024 models take resolution / aspect-ratio micro-conditions.
        "PixArtAlphaPipeline": "PixArt-Alpha's micro-conditions are not implemented yet (PixArtSigmaPipeline is)",
        "PixArtSigmaPAGPipeline": "perturbed-attention guidance sampling is not implemented yet",
    }
    pipeline_class = "PixArtSigmaPipeline"
    bnn_include = TRANSFORMER_BNN_INCLUDE
    bnn_exclude = TRANSFORMER_BNN_EXCLUDE
    fsdp_blocks = ("diffusers.models.attention:BasicTransformerBlock",)

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return type(parts.denoiser).__name__ == "PixArtTransformer2DModel"

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        if parts.text_encoder is None or parts.tokenizer is None:
            raise ValueError("PixArt-Sigma needs its T5 text encoder and tokenizer (model.components.text_encoder)")
        if type(parts.text_encoder).__name__ != "T5EncoderModel":
            raise NotImplementedError(
                "a PixArtTransformer2DModel is supported as PixArt-Sigma, with its T5EncoderModel text encoder and "
                f"tokenizer (this model's text encoder: {type(parts.text_encoder).__name__})"
            )
        if getattr(parts.denoiser, "use_additional_conditions", False):
            raise ValueError(
                f"this {type(parts.denoiser).__name__} uses resolution/aspect-ratio micro-conditions "
                "(use_additional_conditions), which PixArtSigmaPipeline never passes: it is not a PixArt-Sigma model"
            )
        default = pipeline_max_sequence_length(self.pipeline_class)
        self.max_sequence_length = min(default, parts.tokenizer.model_max_length)

    # --------------------------------------------------------------------------------------------- encoding
    def tokenize(self, parts: Components, prompts: Sequence[str]) -> list[torch.Tensor]:
        """``[input_ids, attention_mask]`` (B, L) as ``encode_prompt`` makes them; both key the text cache."""
        text = [p.lower().strip() for p in prompts]
        tokens = parts.tokenizer(
            text,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return [tokens.input_ids, tokens.attention_mask]

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, mask = ids
        states = parts.text_encoder(input_ids, attention_mask=mask)[0]
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    def denoise(self, denoiser, noisy, t, cond: Condition):
        t = batch_timesteps(t, noisy)
        return denoiser(
            noisy,
            encoder_hidden_states=cond.fields["encoder_hidden_states"],
            encoder_attention_mask=cond.fields["encoder_attention_mask"],
            timestep=t,
            added_cond_kwargs=dict(NO_MICRO_CONDITIONS),
        ).sample

    # ---------------------------------------------------------------------------------------- sizes
    def resolution_multiple(self, parts: Components) -> int | None:
        """PixArt's patch embedding recomputes its sin-cos grid for other sizes (Sigma trains multi-aspect):
        sides must be multiples of a patch in pixels."""
        return self.vae_scale_factor(parts) * parts.denoiser.config.patch_size

    # ------------------------------------------------------------------------------------- sampling, export
    def negative_inputs(self, negative_prompt, n):
        return negative_prompt or ""  # the pipeline's own default, encoded like any prompt

    def pipeline_call_kwargs(self, module) -> dict:
        return {
            "clean_caption": False,
            "use_resolution_binning": False,
            "max_sequence_length": self.max_sequence_length,
        }

    def describe(self) -> str:
        return f"{self.name} (text-to-image, T5, {self.max_sequence_length} tokens)"
