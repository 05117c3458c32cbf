"""FLUX.2: dev (``Flux2Pipeline``, Mistral3) and klein (``Flux2KleinPipeline``, Qwen3), siblings under ``Flux2Family``.

As the pipelines (diffusers/pipelines/flux2/) and diffusers' train_dreambooth_lora_flux2{,_klein}.py:

- prompts as ``encode_prompt``: dev's batch through ``format_input`` (the system message, then the prompt) and the
  tokenizer's (processor's) ``apply_chat_template``; klein's as one templated user message each
  (``add_generation_prompt=True, enable_thinking=False``). Padded and truncated to ``max_sequence_length`` (512, or
  the tokenizer's ``model_max_length`` when shorter, then recorded for the export's pipeline call). Condition: the
  hidden states of the pipeline's ``text_encoder_out_layers`` (dev 10, 20, 30; klein 9, 18, 27) side by side, and
  ``txt_ids`` (0, 0, 0, l); no mask. The empty prompt is templated like any other (klein's negative branch);
- model space as the scripts build it: the posterior's mode, patchified 2x2 into 4C channels and normalised by the
  VAE's batch-norm statistics, (z - running_mean) / sqrt(running_var + eps), which the pipelines undo to decode;
- the transformer gets its (h * w, 4C) tokens, ``img_ids`` (0, row, column, 0), sigma (the pipelines' timestep /
  1000) and, dev only, the distilled guidance 3.5 (the script's default; sampling passes the guidance scale);
- sigma shift: the scripts train on the scheduler's *unshifted* table (``use_dynamic_shifting`` leaves it so):
  ``model.flow_shift: 1.0``. The pipelines sample with ``compute_empirical_mu(tokens, steps)``, between a 10-step and
  a 200-step line in the tokens; the 200-step line (mu at any step count above 4300 tokens) is exactly the
  scheduler's ``base_shift``/``max_shift`` line, Flux.1's rule. The default is that step-free line (the scheduler's
  resolution shift, as for Flux.1): where the pipeline samples, without the few-step correction, which belongs to the
  sampler's step count, not to the noise levels the model learns. ``flow_shift`` exp(mu) gives one size's schedule;
- uniform timesteps (``weighting_scheme="none"``); LoRA on the scripts' default targets, saved by
  ``Flux2LoraLoaderMixin`` under ``transformer``.
"""

from __future__ import annotations

import inspect

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.families.base import (
    FLOW,
    TRANSFORMER_BNN_EXCLUDE,
    TRANSFORMER_BNN_INCLUDE,
    batch_timesteps,
    pipeline_max_sequence_length,
)
from lightning_ft.core.families.text import SequenceLengthCall, TextFamily

_MODULE = "diffusers.models.transformers.transformer_flux2"


def _lora_targets(single_blocks: int) -> tuple[str, ...]:
    """The scripts' default ``target_modules``: both blocks' attention, and every single block's output projection."""
    attention = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj")
    return (*attention, *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(single_blocks)))


class Flux2Family(SequenceLengthCall, TextFamily):
    """What FLUX.2 dev and klein share (module docstring): latent space, packing, ids, transformer call, LoRA."""

    pipeline_class = "Flux2Pipeline"
    lora_prefix = "transformer"
    processes = FLOW
    default_timestep_density = "uniform"
    # BNN: the blocks' image stream and single blocks (as Flux.1); not the text stream, not the modulation (outside).
    bnn_include = TRANSFORMER_BNN_INCLUDE
    bnn_exclude = TRANSFORMER_BNN_EXCLUDE
    fsdp_blocks = (f"{_MODULE}:Flux2TransformerBlock", f"{_MODULE}:Flux2SingleTransformerBlock")
    #: The double blocks' joint attention (image stream); single blocks' parallel attention has no to_out list.
    attention_names = ("attn",)
    tokens_per_latent = 1  # model space is already patchified: one latent pixel, one token
    #: The pipelines' ``default_sample_size`` (latent side of 1024 px): the transformer's config has no sample size.
    default_sample_size = 128
    #: The variant's text encoder class (``matches``) and the guidance value it trains with (None: not embedded).
    encoder_class, guidance = "", None

    @classmethod
    def matches(cls, parts: Components) -> bool:
        names = (type(parts.denoiser).__name__, type(parts.text_encoder).__name__)
        return names == ("Flux2Transformer2DModel", cls.encoder_class)

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        if parts.text_encoder is None or parts.tokenizer is None:
            raise ValueError(f"{self.name} needs its {self.encoder_class} text encoder and tokenizer")
        import diffusers

        encode_prompt = inspect.signature(getattr(diffusers, self.pipeline_class).encode_prompt)
        self.layers = tuple(encode_prompt.parameters["text_encoder_out_layers"].default)
        depth = parts.text_encoder.config.get_text_config().num_hidden_layers
        if max(self.layers) > depth:
            raise ValueError(f"{self.pipeline_class} reads hidden states {self.layers}: the text encoder has {depth}")
        self.default_length = pipeline_max_sequence_length(self.pipeline_class)
        tokenizer = getattr(parts.tokenizer, "tokenizer", parts.tokenizer)  # dev's processor holds its tokenizer
        self.max_sequence_length = min(self.default_length, tokenizer.model_max_length)

    # --------------------------------------------------------------------------------------------- encoding
    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, mask = ids
        out = parts.text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        states = torch.cat([out.hidden_states[k] for k in self.layers], dim=-1)  # (B, L, layers x D), layer-major
        txt_ids = torch.zeros(*states.shape[:2], 4, dtype=torch.long, device=states.device)
        txt_ids[..., 3] = torch.arange(states.shape[1], device=states.device)  # (0, 0, 0, l): ``_prepare_text_ids``
        return {"encoder_hidden_states": states, "txt_ids": txt_ids}

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h * w, C), row-major (``_pack_latents``)."""
        return x.flatten(2).transpose(1, 2)

    @staticmethod
    def image_ids(h: int, w: int, device) -> torch.Tensor:
        """(h * w, 4): (0, row, column, 0) of each token (``_prepare_latent_ids``)."""
        ids = torch.zeros(h, w, 4, dtype=torch.long, device=device)
        ids[..., 1] = torch.arange(h, device=device)[:, None]
        ids[..., 2] = torch.arange(w, device=device)[None, :]
        return ids.view(h * w, 4)

    def denoise(self, denoiser, noisy, t, cond):
        b, c, h, w = noisy.shape
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=noisy.device)
        out = denoiser(
            hidden_states=self.pack(noisy),
            timestep=batch_timesteps(t, noisy) / 1000,
            guidance=guidance,
            encoder_hidden_states=cond.fields["encoder_hidden_states"],
            txt_ids=cond.fields["txt_ids"][0],
            img_ids=self.image_ids(h, w, noisy.device),
        ).sample
        return out[:, : h * w].transpose(1, 2).reshape(b, -1, h, w)

    # ------------------------------------------------------------------------------------------- latent space
    def vae_posterior(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """The scripts train on the posterior's mode (``latent_dist.mode()``), not a draw: zero spread."""
        mode = vae.encode(pixels).latent_dist.mode()
        return torch.stack([mode, torch.zeros_like(mode)], dim=1)

    def model_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patches)
        return (patches - mean) / std

    # ---------------------------------------------------------------------------------------- sizes
    def latent_size(self, parts: Components) -> int:
        return self.default_sample_size

    def resolution_multiple(self, parts: Components) -> int:
        return self.vae_scale_factor(parts) * 2  # 2x2 patches

    # ------------------------------------------------------------------------------------- sampling, export
    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        if negative_prompt:
            raise ValueError(f"{self.pipeline_class} takes no negative prompt (klein guides against the empty one)")
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        # prompt by keyword: the pipelines' first positional argument is a reference image.
        out = pipe(prompt=list(inputs.prompts), num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, output_type="pt", **self.pipeline_call_kwargs(module)).images  # fmt: skip
        return out.float().clamp(0, 1)


class Flux2(Flux2Family):
    """FLUX.2 dev: Mistral3 with the pipeline's system message, guidance-distilled transformer."""

    name = "flux2"
    pipelines = ("Flux2Pipeline",)
    encoder_class = "Mistral3ForConditionalGeneration"
    guidance = 3.5  # the script's --guidance_scale default
    lora_targets = _lora_targets(48)

    def tokenize(self, parts: Components, prompts) -> list[torch.Tensor]:
        from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

        tokens = parts.tokenizer.apply_chat_template(
            format_input(list(prompts), SYSTEM_MESSAGE), add_generation_prompt=False, tokenize=True,
            return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
            max_length=self.max_sequence_length,
        )  # fmt: skip
        return [tokens["input_ids"], tokens["attention_mask"]]


class Flux2Klein(Flux2Family):
    """FLUX.2 klein: Qwen3 over a user message per prompt, no guidance embedding, true CFG (or step-distilled)."""

    name = "flux2_klein"
    pipelines = ("Flux2KleinPipeline",)
    pipeline_class = "Flux2KleinPipeline"
    refused = {
        "Flux2KleinInpaintPipeline": "inpainting (masked image latents beside the target's) is not trained by "
        "lightning-ft yet (Flux2KleinPipeline is)",
        "Flux2KleinKVPipeline": "it conditions on reference images through a KV cache, which lightning-ft does not "
        "train yet (Flux2KleinPipeline is)",
    }
    encoder_class = "Qwen3ForCausalLM"
    lora_targets = _lora_targets(24)

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        if parts.denoiser.config.guidance_embeds:
            raise ValueError("this Flux2Transformer2DModel embeds a guidance value (FLUX.2 dev's), which "
                             "Flux2KleinPipeline never passes: it is not a klein model")  # fmt: skip

    def tokenize(self, parts: Components, prompts) -> list[torch.Tensor]:
        tokenizer = parts.tokenizer
        messages = [[{"role": "user", "content": p}] for p in prompts]
        text = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True, enable_thinking=False)
                for m in messages]  # fmt: skip
        tokens = tokenizer(text, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                           return_tensors="pt")  # fmt: skip
        return [tokens.input_ids, tokens.attention_mask]

    def pipeline_options(self) -> dict:
        # A step-distilled klein samples without CFG; the folder's model_index says which (kept by the export).
        return {"is_distilled": bool(self.settings.get("is_distilled", False))}
