"""Z-Image: a Qwen3-conditioned single-stream transformer on the flow-matching process (``ZImagePipeline``).

Conditions and sampling follow ``ZImagePipeline`` (diffusers/pipelines/z_image/pipeline_z_image.py), training
diffusers' DreamBooth-LoRA script (examples/dreambooth/train_dreambooth_lora_z_image.py):

- prompts as ``ZImagePipeline._encode_prompt``: each one wrapped by the tokenizer's chat template (one user message,
  ``add_generation_prompt=True, enable_thinking=True``), tokenised right-padded and truncated to
  ``max_sequence_length`` (the pipeline's 512, or the tokenizer's ``model_max_length`` when shorter), the text
  encoder's ``hidden_states[-2]`` under the attention mask. The pipeline hands the transformer a list of each prompt's
  valid tokens (L_i, D); the text cache holds per-sample tensors of one length, so the states are kept padded (zeros
  past the prompt) with their mask, and ``denoise`` cuts each list entry back out. The encoder is causal and padded on
  the right: the padding changes nothing in the valid states. The empty prompt (null input, the pipeline's default
  negative) goes through the template like any other prompt;
- the transformer takes a list of per-sample latents (C, 1, H, W) (a frame axis) and the timestep
  (1000 - t) / 1000 = 1 - sigma (t = 1000 sigma, as ``model_timesteps`` gives), and returns a list. Its output points
  from noise to data (x0 - eps): pipeline and script negate it. ``denoise`` returns that negation, eps - x0, the
  target of ``FlowMatchingProcess``, so every method reads the prediction in the framework's convention;
- latents as the script makes them: ``latent_dist.mode()`` (not a draw, as the SD / Flux scripts take), then
  ``(z - shift_factor) * scaling_factor``;
- sigma shift: the model's scheduler's, what the pipeline samples with. Z-Image-Turbo ships a fixed ``shift: 3.0``,
  the table the script trains on too. A scheduler with ``use_dynamic_shifting`` differs: the script's table is then
  unshifted and the pipeline samples with exp(mu) (mu linear in the image tokens); lightning-ft trains where the
  pipeline samples (the default, as for Flux here), ``model.flow_shift: 1.0`` reproduces the script;
- timesteps uniform (the script's ``weighting_scheme="none"``); LoRA on the script's default ``to_k, to_q, to_v,
  to_out.0`` (every attention: main layers and both refiners), saved by ``ZImageLoraLoaderMixin``;
- guidance: ``ZImagePipeline`` computes pos + g (pos - neg), i.e. neg + (1 + g)(pos - neg), and guides only for
  g > 0; lightning-ft's scale w (neg + w (pos - neg)) is passed as g = w - 1 (guided for w > 1, as elsewhere), with
  the pipeline's defaults ``cfg_normalization=False``, ``cfg_truncation=1.0`` (every step guided).
"""

from __future__ import annotations

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.families.base import FLOW, batch_timesteps, pipeline_max_sequence_length
from lightning_ft.core.families.text import SequenceLengthCall, TextFamily

_EDIT = "it conditions on an input image, which lightning-ft does not train yet (ZImagePipeline is)"


class ZImage(SequenceLengthCall, TextFamily):
    """Z-Image (module docstring): Qwen3 states of the chat-templated prompt, per-sample token lists, flow matching."""

    name = "z_image"
    pipelines = ("ZImagePipeline",)
    refused = {
        "ZImageImg2ImgPipeline": _EDIT,
        "ZImageInpaintPipeline": _EDIT,
        "ZImageControlNetPipeline": "ControlNet training is not in lightning-ft yet",
        "ZImageControlNetInpaintPipeline": "ControlNet training is not in lightning-ft yet",
        "ZImageOmniPipeline": "it conditions on reference images and SigLIP features, which lightning-ft does not "
        "train yet (ZImagePipeline is)",
    }
    pipeline_class = "ZImagePipeline"
    lora_prefix = "transformer"
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    # BNN (inferred, as for the other transformers): the blocks that read the image, i.e. the noise refiner and the
    # main single-stream layers; not their adaLN timestep modulation, not the text-only context refiner, not the
    # caption / timestep embedders outside the blocks.
    bnn_include = ("layers.*", "noise_refiner.*")
    bnn_exclude = ("*.adaLN_modulation.*",)
    fsdp_blocks = ("diffusers.models.transformers.transformer_z_image:ZImageTransformerBlock",)
    #: The blocks' attention (``attention``: self-attention over image and text tokens, and of each refiner).
    attention_names = ("attention",)
    #: Its own timestep embedder (not a diffusers TimestepEmbedding), which A3FTA's adapters read.
    time_embedding = "t_embedder"
    processes = FLOW
    default_timestep_density = "uniform"
    #: ZImagePipeline decodes (z / scaling_factor) + shift_factor: a VAE without one (SD's) means 0.
    vae_defaults = {"shift_factor": 0.0}
    #: The pipeline's default side (``height or 1024``): the transformer's config has no sample size.
    default_side = 1024

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return type(parts.denoiser).__name__ == "ZImageTransformer2DModel"

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        if parts.text_encoder is None or parts.tokenizer is None:
            raise ValueError("Z-Image needs its Qwen3 text encoder and tokenizer (model.components.text_encoder)")
        if getattr(parts.tokenizer, "chat_template", None) is None:
            raise ValueError("Z-Image's tokenizer needs a chat template (ZImagePipeline applies it to every prompt)")
        self.max_sequence_length = min(pipeline_max_sequence_length(self.pipeline_class),
                                       parts.tokenizer.model_max_length)  # fmt: skip

    # --------------------------------------------------------------------------------------------- encoding
    def tokenize(self, parts: Components, prompts) -> list[torch.Tensor]:
        """``[input_ids, attention_mask]`` (B, max_sequence_length) of the chat-templated prompts."""
        tokenizer = parts.tokenizer
        text = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=True)
            for p in prompts
        ]  # fmt: skip
        tokens = tokenizer(text, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                           return_tensors="pt")  # fmt: skip
        return [tokens.input_ids, tokens.attention_mask]

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, mask = ids
        out = parts.text_encoder(input_ids=input_ids, attention_mask=mask.bool(), output_hidden_states=True)
        # Zeros past the prompt: the pipeline drops those positions, so nothing may depend on them.
        states = out.hidden_states[-2].masked_fill(~mask.bool()[..., None], 0.0)
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}

    @staticmethod
    def caption_list(cond) -> list[torch.Tensor]:
        """The pipeline's ``prompt_embeds``: each sample's valid states (L_i, D)."""
        mask = cond.fields["encoder_attention_mask"].bool()
        return [states[m] for states, m in zip(cond.fields["encoder_hidden_states"], mask)]

    def denoise(self, denoiser, noisy, t, cond):
        timestep = (1000 - batch_timesteps(t, noisy)) / 1000  # the pipeline's (1000 - t) / 1000 = 1 - sigma
        out = denoiser(list(noisy.unsqueeze(2).unbind(0)), timestep, self.caption_list(cond), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # x0 - eps -> the framework's eps - x0 (the pipeline negates too)

    # ------------------------------------------------------------------------------------------- latent space
    def vae_posterior(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """The script trains on the posterior's mode, not a draw: the mean with zero spread."""
        mode = vae.encode(pixels).latent_dist.mode()
        return torch.stack([mode, torch.zeros_like(mode)], dim=1)

    # ---------------------------------------------------------------------------------------- sizes
    def latent_size(self, parts: Components) -> int:
        return self.default_side // self.vae_scale_factor(parts)

    def resolution_multiple(self, parts: Components) -> int:
        # ZImagePipeline.__call__: sides divisible by vae_scale_factor * 2 (2x2 patches).
        return self.vae_scale_factor(parts) * 2

    # ------------------------------------------------------------------------------------- sampling
    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        # lightning-ft's scale w is the pipeline's 1 + g (module docstring). The base passes the prompts as a fresh
        # list, which matters here: ZImagePipeline.encode_prompt writes the templated prompts into the list it gets.
        return super().sample(module, pipe, inputs, seeds, steps, guidance - 1.0, negative_prompt)

    def pipeline_call_kwargs(self, module) -> dict:
        return {**super().pipeline_call_kwargs(module), "cfg_normalization": False, "cfg_truncation": 1.0}

    def describe(self) -> str:
        return f"{self.name} (text-to-image, Qwen3, {self.max_sequence_length} tokens)"
