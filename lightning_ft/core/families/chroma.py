"""Chroma: a Flux.1-schnell-derived transformer conditioned on T5 alone, with a mask on the T5 tokens, by flow matching.

Conditions and sampling follow ``ChromaPipeline`` (diffusers/pipelines/chroma/pipeline_chroma.py). diffusers has no
training script for Chroma: the reference of the loss is its Flux.1 DreamBooth-LoRA script
(examples/dreambooth/train_dreambooth_lora_flux.py) with the transformer called as ``ChromaPipeline`` calls it:

- prompts as ``_get_t5_prompt_embeds``: T5 tokens padded and truncated to ``max_sequence_length`` (the pipeline's 512,
  or the tokenizer's ``model_max_length`` when shorter), T5's last hidden state *under the tokenizer's mask* (Flux
  passes none), every position kept (the padding states too, as the pipeline hands them on). The transformer's text
  mask is the tokenizer's with the first padding token unmasked (``position <= length``, Chroma's rule), extended by
  ones over the image tokens; diffusers' blocks multiply it into a (text + image)^2 float 0/1 mask, which attention
  adds to its logits: the masked padding is down-weighted, not removed, so its states are kept as the pipeline's. The
  empty prompt (null input, the pipeline's default negative) is encoded like any other;
- no CLIP, no pooled projection and no guidance embedding: the transformer's modulations come from its own
  approximator (``distilled_guidance_layer``) of the timestep alone;
- as Flux.1: latents ``(z - shift_factor) * scaling_factor`` of a posterior draw, packed 2x2 into tokens with the
  (row, column) ``img_ids`` and zero ``txt_ids``, the transformer given sigma (the pipeline's t / 1000), its output the
  velocity eps - x0 (the framework's target); timesteps uniform (the script's ``weighting_scheme="none"``). Shift: the
  script trains on its scheduler copy's table (unshifted for a ``use_dynamic_shifting`` scheduler) while the pipeline
  samples at exp(mu), mu linear in the image tokens; lightning-ft trains where the pipeline samples (as for Flux here),
  ``model.flow_shift: 1.0`` reproduces the script;
- guidance: real classifier-free guidance, neg + w (pos - neg) with the negative prompt (default ``""``) for w > 1,
  which is ``guidance_scale`` itself: passed as is;
- LoRA in the ``transformer`` layout of ``FluxLoraLoaderMixin`` (``ChromaPipeline.load_lora_weights``), on Flux.1's
  targets (the same block and layer names); no kohya writer (``kohya_lora`` unset: Flux.1's converter was not
  checked against Chroma's checkpoint, which has no modulation layers and an approximator of its own).

Gradient checkpointing: diffusers' ``ChromaTransformer2DModel`` calls its single blocks without the mask when it
checkpoints, so ``model.gradient_checkpointing`` trains those blocks on unmasked text while the pipeline samples them
masked (diffusers' behaviour, left as it is).

Chroma is a sibling of Flux.1 under ``JointTransformerFamily``, not a subclass of ``Flux``: Flux sets CLIP + T5
encoders, the pooled projection and the guidance value; Chroma would have to undo all three.
"""

from __future__ import annotations

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.families.base import batch_timesteps, pack_2x2, pipeline_max_sequence_length, unpack_2x2
from lightning_ft.core.families.joint_transformer import Flux, JointTransformerFamily

_IMAGE = "it starts from an input image, which lightning-ft does not train yet (ChromaPipeline is)"


class Chroma(JointTransformerFamily):
    """Chroma (module docstring): T5 states and Chroma's text mask, 2x2-packed latents, real CFG."""

    name = "chroma"
    pipelines = ("ChromaPipeline",)
    pipeline_class = "ChromaPipeline"
    refused = {"ChromaImg2ImgPipeline": _IMAGE, "ChromaInpaintPipeline": _IMAGE}
    text_encoders = ("text_encoder",)
    t5_tokenizer = "tokenizer"
    fsdp_blocks = (
        "diffusers.models.transformers.transformer_chroma:ChromaTransformerBlock",
        "diffusers.models.transformers.transformer_chroma:ChromaSingleTransformerBlock",
    )
    lora_targets = Flux.lora_targets
    #: The approximator whose output (B, modulations, width) holds every block's timestep modulation: A3FTA reads
    #: its mean over the modulations (the model has no ``TimestepEmbedding``).
    time_embedding = "distilled_guidance_layer"
    #: ``ChromaPipeline.default_sample_size`` (latent side): the transformer's config has no sample size.
    default_sample_size = 128

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return type(parts.denoiser).__name__ == "ChromaTransformer2DModel"

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        if parts.text_encoder is None or parts.tokenizer is None:
            raise ValueError("Chroma needs its T5 text encoder and tokenizer (model.components.text_encoder)")
        self.max_sequence_length = min(pipeline_max_sequence_length(self.pipeline_class),
                                       parts.tokenizer.model_max_length)  # fmt: skip

    # --------------------------------------------------------------------------------------------- encoding
    def tokenize(self, parts: Components, prompts) -> list[torch.Tensor]:
        """``[input_ids, attention_mask]`` (B, max_sequence_length), as ``_get_t5_prompt_embeds`` tokenises."""
        tokens = parts.tokenizer(list(prompts), padding="max_length", max_length=self.max_sequence_length,
                                 truncation=True, return_tensors="pt")  # fmt: skip
        return [tokens.input_ids, tokens.attention_mask]

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, mask = ids
        states = parts.text_encoder(input_ids, attention_mask=mask, output_hidden_states=False)[0]
        # The transformer's text mask: the prompt's tokens and the first padding token (the pipeline's rule).
        kept = torch.arange(mask.shape[1], device=mask.device) <= mask.sum(1, keepdim=True)
        return {"encoder_hidden_states": states, "encoder_attention_mask": kept.long()}

    def denoise(self, denoiser, noisy, t, cond):
        b, _, h, w = noisy.shape
        context = cond.fields["encoder_hidden_states"]
        text_mask = cond.fields["encoder_attention_mask"].to(noisy.dtype)
        # _prepare_attention_mask: the text mask, then ones over the (h/2) x (w/2) image tokens.
        mask = torch.cat([text_mask, text_mask.new_ones(b, (h // 2) * (w // 2))], dim=1)
        out = denoiser(
            hidden_states=pack_2x2(noisy),
            timestep=batch_timesteps(t, noisy) / 1000,
            encoder_hidden_states=context,
            txt_ids=torch.zeros(context.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=Flux.image_ids(h, w, noisy.device, noisy.dtype),
            attention_mask=mask,
        ).sample
        return unpack_2x2(out, h, w)

    # ---------------------------------------------------------------------------------------- sizes
    def latent_size(self, parts: Components) -> int:
        return self.default_sample_size

    def resolution_multiple(self, parts: Components) -> int:
        return self.vae_scale_factor(parts) * 2  # 2x2 packing

    def describe(self) -> str:
        return f"{self.name} (text-to-image, T5, {self.max_sequence_length} tokens)"
