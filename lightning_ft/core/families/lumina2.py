"""Lumina 2: a Gemma2-conditioned joint text + image transformer on the flow-matching process (``Lumina2Pipeline``).

Conditions and sampling follow ``Lumina2Pipeline`` (diffusers/pipelines/lumina2/pipeline_lumina2.py), training
diffusers' DreamBooth-LoRA script (examples/dreambooth/train_dreambooth_lora_lumina2.py):

- prompts as ``Lumina2Pipeline.encode_prompt``: each one prefixed with the system prompt and ``" <Prompt Start> "``
  (the pipeline's ``system_prompt``, the script's default), tokenised right-padded and truncated to
  ``max_sequence_length`` (the pipeline's 256, or the tokenizer's ``model_max_length`` when shorter), Gemma2's
  ``hidden_states[-2]`` with the attention mask, both handed to the transformer. The transformer reads only the valid
  tokens (its context refiner masks the padding, its joint sequence keeps each caption's valid length), and the causal
  encoder's valid states do not depend on the padding: a plain call's 256 tokens samples the same images;
- the unconditional branch is the pipeline's negative branch: the empty prompt *without* the system prompt. The null
  input ``""`` (condition dropout, guidance, retention on unconditional samples) is encoded that way, so it trains the
  branch guidance uses (a prompt ``""`` asked of the pipeline as a positive prompt gets the system prompt);
- the transformer takes the latents (B, C, H, W) and the timestep 1 - sigma (the pipeline's ``1 - t / 1000``: Lumina
  counts t = 0 at the noise and 1 at the image), and returns the velocity from noise to data, x0 - eps, which the
  pipeline negates before its Euler step. ``denoise`` returns that negation, eps - x0, the target of
  ``FlowMatchingProcess``;
- noise levels: the script draws u, takes the sigma s of its scheduler's (shifted) table and noises with the
  *reversed* lerp (1 - s) eps + s x0, giving the transformer s: its noise level is 1 - s. With a shift S that is
  1 - shift_S(u) = shift_{1/S}(1 - u), the mirror image of where the pipeline samples (shift_S towards the noise).
  lightning-ft trains where the pipeline samples (the scheduler's shift, as for the other flow families);
  ``model.flow_shift: 1/S`` reproduces the script's noise levels (uniform u is its own mirror image);
- latents as the script makes them: a draw of the posterior (``latent_dist.sample()``), then
  ``(z - shift_factor) * scaling_factor``;
- timesteps uniform (the script's ``weighting_scheme="none"``); LoRA on the script's default ``to_k, to_q, to_v,
  to_out.0`` (every attention: both refiners and the joint layers), saved by ``Lumina2LoraLoaderMixin``;
- guidance: ``Lumina2Pipeline`` computes neg + w (pos - neg), guided for w > 1 (lightning-ft's scale, passed as is),
  by default rescaled to the norm of the conditional prediction (``cfg_normalization=True``) on every step
  (``cfg_trunc_ratio=1.0``): sampling passes those defaults, so a plain ``pipe(prompt)`` of the export samples the
  module's images;
- the pipeline assumes a VAE of 8x spatial compression (``vae_scale_factor = 8``, not read from the VAE): another VAE
  is refused. Sides must be multiples of 16 (8 x the 2x2 patches; ``check_inputs``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.families.base import FLOW, batch_timesteps, pipeline_max_sequence_length
from lightning_ft.core.families.text import SequenceLengthCall, TextFamily

#: ``Lumina2Pipeline.__init__``: ``self.vae_scale_factor = 8``, whatever the VAE.
PIPELINE_VAE_SCALE = 8


@functools.cache
def pipeline_system_prompt(pipeline_class: str = "Lumina2Pipeline") -> str:
    """The system prompt a plain pipeline call prepends (set in ``__init__``: read from an empty pipeline)."""
    import diffusers

    empty = getattr(diffusers, pipeline_class)(transformer=None, scheduler=None, vae=None, text_encoder=None,
                                               tokenizer=None)  # fmt: skip
    return empty.system_prompt


class Lumina2(SequenceLengthCall, TextFamily):
    """Lumina 2 (module docstring): Gemma2 states of the system-prompted prompt with its mask, flow matching."""

    name = "lumina2"
    pipelines = ("Lumina2Pipeline",)
    refused = {
        "LuminaPipeline": "Lumina-Next (a LuminaNextDiT2DModel on a Gemma text encoder) is another model, which "
        "lightning-ft does not train yet (Lumina2Pipeline is)",
    }
    pipeline_class = "Lumina2Pipeline"
    lora_prefix = "transformer"
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    # BNN (inferred, as for the other transformers): the blocks that read the image, i.e. the noise refiner and the
    # joint layers; not their adaLN modulation (``norm1.linear``), not the text-only context refiner, not the
    # caption / timestep embedders outside the blocks.
    bnn_include = ("layers.*", "noise_refiner.*")
    bnn_exclude = (r"re:.*\.norm[^.]*\..*",)
    fsdp_blocks = ("diffusers.models.transformers.transformer_lumina2:Lumina2TransformerBlock",)
    #: The blocks' attention (``attn``: self-attention of each refiner, joint attention of the layers).
    attention_names = ("attn",)
    #: The timestep embedder inside the combined timestep-caption embedding, which A3FTA's adapters read.
    time_embedding = "time_caption_embed.timestep_embedder"
    processes = FLOW
    default_timestep_density = "uniform"
    #: Lumina2Pipeline decodes (z / scaling_factor) + shift_factor: a VAE without one (SD's) means 0.
    vae_defaults = {"shift_factor": 0.0}

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return type(parts.denoiser).__name__ == "Lumina2Transformer2DModel"

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        if parts.text_encoder is None or parts.tokenizer is None:
            raise ValueError("Lumina 2 needs its Gemma2 text encoder and tokenizer (model.components.text_encoder)")
        if parts.vae is not None and super().vae_scale_factor(parts) != PIPELINE_VAE_SCALE:
            raise ValueError(f"Lumina 2: the VAE compresses {super().vae_scale_factor(parts)}x, and Lumina2Pipeline "
                             f"assumes {PIPELINE_VAE_SCALE}x (its vae_scale_factor is fixed)")  # fmt: skip
        self.tokens_per_latent = parts.denoiser.config.patch_size**2
        self.max_sequence_length = min(pipeline_max_sequence_length(self.pipeline_class),
                                       parts.tokenizer.model_max_length)  # fmt: skip
        # An export records a system prompt other than the pipeline's (``export``); a reloaded export keeps it.
        call = dict(parts.declared.get("pipeline_call") or {})
        #: The system prompt prefixed to every prompt in training and sampling.
        self.system_prompt: str = call.get("system_prompt", pipeline_system_prompt(self.pipeline_class))

    # --------------------------------------------------------------------------------------------- encoding
    def tokenize(self, parts: Components, prompts: Sequence[str]) -> list[torch.Tensor]:
        """``[input_ids, attention_mask]`` (B, max_sequence_length): the system-prompted prompts, and the empty
        prompt (the null input) without it, as the pipeline's negative branch."""
        text = [f"{self.system_prompt} <Prompt Start> {p}" if p else "" for p in prompts]
        tokens = parts.tokenizer(text, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                 padding_side="right", return_tensors="pt")  # fmt: skip
        return [tokens.input_ids, tokens.attention_mask]

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, mask = ids
        out = parts.text_encoder(input_ids, attention_mask=mask, output_hidden_states=True)
        return {"encoder_hidden_states": out.hidden_states[-2], "encoder_attention_mask": mask}

    def denoise(self, denoiser, noisy, t, cond):
        timestep = 1 - batch_timesteps(t, noisy) / 1000  # the pipeline's 1 - t / num_train_timesteps = 1 - sigma
        out = denoiser(hidden_states=noisy, timestep=timestep,
                       encoder_hidden_states=cond.fields["encoder_hidden_states"],
                       encoder_attention_mask=cond.fields["encoder_attention_mask"], return_dict=False)[0]  # fmt: skip
        return -out  # x0 - eps -> the framework's eps - x0 (the pipeline negates too)

    # ---------------------------------------------------------------------------------------- sizes
    def vae_scale_factor(self, parts: Components) -> int:
        return PIPELINE_VAE_SCALE

    def resolution_multiple(self, parts: Components) -> int:
        # Lumina2Pipeline.check_inputs: sides divisible by vae_scale_factor * 2 (2x2 patches).
        return PIPELINE_VAE_SCALE * parts.denoiser.config.patch_size

    # ------------------------------------------------------------------------------------- sampling, export
    def pipeline_call_kwargs(self, module) -> dict:
        return {**super().pipeline_call_kwargs(module),
                "system_prompt": self.system_prompt, "cfg_normalization": True, "cfg_trunc_ratio": 1.0}  # fmt: skip

    def export(self, parts: Components, scheduler, path) -> dict:
        record = super().export(parts, scheduler, path)
        if self.system_prompt != pipeline_system_prompt(self.pipeline_class):
            # Not what a plain call prepends: recorded, and read back when the export is loaded here.
            record = {**record, "pipeline_call": {"system_prompt": self.system_prompt}}
        return record

    def describe(self) -> str:
        return f"{self.name} (text-to-image, Gemma2, {self.max_sequence_length} tokens)"
