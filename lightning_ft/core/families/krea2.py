"""Krea 2: a Qwen3-VL-conditioned single-stream transformer on Qwen-Image's VAE, by flow matching (``Krea2Pipeline``).

Conditions and sampling follow ``Krea2Pipeline`` (diffusers/pipelines/krea2/pipeline_krea2.py), training diffusers'
DreamBooth-LoRA script (examples/dreambooth/train_dreambooth_lora_krea2.py):

- prompts as ``get_text_hidden_states``: a fixed-length block, Qwen-Image's system turn and ``<|im_start|>user\\n``
  (34 tokens), the prompt padded and truncated to ``max_sequence_length`` - 5 tokens, then the 5 tokens of
  ``<|im_end|>\\n<|im_start|>assistant\\n`` *after* the padding; RoPE positions count only the valid tokens (the
  padding takes none). The condition is the stack of the text encoder's ``hidden_states`` at the pipeline's
  ``text_encoder_select_layers`` (Krea 2: 2, 5, ..., 35 of Qwen3-VL-4B), (L, layers, D) per token, without the 34
  prefix tokens, and the mask of the ``max_sequence_length`` tokens kept (the pipeline's 512, or the tokenizer's
  ``model_max_length`` when shorter). The layout has one length for every prompt: the text cache holds the pipeline's
  very tensors. The empty prompt (null input, the pipeline's default negative) is laid out like any other;
- latents as the script makes them: a draw from the VAE posterior of the images as one-frame clips, then
  ``(z - latents_mean) * (1 / latents_std)`` per channel (Qwen-Image's); the frame axis is dropped;
- the transformer gets ``patch_size``-packed latents (``_pack_latents``: 2x2, 4 latent pixels a token), the
  ``prepare_position_ids`` of the text and image grid, the states with their (boolean) mask, and sigma as the
  timestep (the pipeline's and script's ``t / 1000``); its output is the velocity eps - x0, the framework's target;
- sigma: uniform (the script's ``weighting_scheme="none"``). The script trains on the scheduler's table, which
  ``use_dynamic_shifting`` leaves unshifted (sigma = u); the pipeline samples at the resolution-dependent shift exp(mu)
  (``calculate_shift`` from ``base_shift`` to ``max_shift`` over 256..6400 image tokens). lightning-ft's default is the
  pipeline's shift, as for Flux and Qwen-Image here; ``model.flow_shift: 1.0`` trains as the script does. A distilled
  checkpoint (``is_distilled``, Turbo) samples at the fixed mu = 1.15: ``model.flow_shift: 3.158`` (exp 1.15) trains
  there; the script's README trains on the base (RAW) checkpoint;
- guidance: ``Krea2Pipeline`` computes cond + g (cond - uncond) and guides for g > 0, i.e. uncond + (1 + g)(cond -
  uncond); lightning-ft's scale w is passed as g = w - 1 (guided for w > 1), the negative prompt default ``""``;
- LoRA on the script's default targets (the Krea 2 authors' set: attention, gate, feed-forward, the text fusion's
  projector, the text and time MLPs, the input and output projections), saved by ``Krea2LoraLoaderMixin``; the
  pipeline's settings (``text_encoder_select_layers``, ``is_distilled``, ``patch_size``) go with the export.
"""

from __future__ import annotations

import re

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.families.base import FLOW, TRANSFORMER_BNN_EXCLUDE, batch_timesteps, pipeline_max_sequence_length
from lightning_ft.core.families.qwen_image import QwenImageLatents
from lightning_ft.core.families.text import SequenceLengthCall, TextFamily

_MODULE = "diffusers.models.transformers.transformer_krea2"
_MODULAR = ("a modular pipeline (blocks assembled at load time), which lightning-ft does not load; it trains and "
            "exports Krea2Pipeline (is_distilled: the Turbo checkpoint)")  # fmt: skip
_PIPELINE_COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
_SETTINGS = ("text_encoder_select_layers", "is_distilled", "patch_size")


class Krea2(QwenImageLatents, SequenceLengthCall, TextFamily):
    """Krea 2 (module docstring): stacked Qwen3-VL layers of a fixed-length prompt block, packed one-frame latents."""

    name = "krea2"
    pipelines = ("Krea2Pipeline",)
    pipeline_class = "Krea2Pipeline"
    refused = {"Krea2ModularPipeline": _MODULAR, "Krea2TurboModularPipeline": _MODULAR}
    lora_prefix = "transformer"
    #: train_dreambooth_lora_krea2.py's default ``target_modules`` (module-name suffixes).
    lora_targets = ("img_in", "final_layer.linear", "to_q", "to_k", "to_v", "to_out.0", "to_gate", "ff.up", "ff.down",
                    "text_fusion.projector", "txt_in.linear_1", "txt_in.linear_2", "time_embed.linear_1",
                    "time_embed.linear_2", "time_mod_proj")  # fmt: skip
    # BNN (inferred, as for the other transformers): every linear of the single-stream blocks (gated attention over
    # text and image tokens, SwiGLU); their timestep modulation is a table, not a linear. Not the text fusion stage,
    # the text / time MLPs nor the input and output projections (outside the blocks).
    bnn_include = ("transformer_blocks.*",)
    bnn_exclude = TRANSFORMER_BNN_EXCLUDE
    fsdp_blocks = (f"{_MODULE}:Krea2TransformerBlock", f"{_MODULE}:Krea2TextFusionBlock")
    #: The blocks' attention; the text fusion's attention (across tapped layers, per token) has no timestep.
    attention_names = ("transformer_blocks.*.attn",)
    #: Its own timestep embedder (not a diffusers TimestepEmbedding), which A3FTA's adapters read.
    time_embedding = "time_embed"
    processes = FLOW
    default_timestep_density = "uniform"
    #: The pipeline's default side (``height=1024``): the transformer's config has no sample size.
    default_side = 1024

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return type(parts.denoiser).__name__ == "Krea2Transformer2DModel"

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        if parts.text_encoder is None or parts.vae is None or parts.vae.config.get("latents_mean") is None:
            raise ValueError("Krea 2 needs its Qwen3-VL text encoder, tokenizer and AutoencoderKLQwenImage")
        import diffusers

        # The prompt layout and the settings' defaults are set in the pipeline's __init__: read, not copied.
        settings = {k: self.settings[k] for k in _SETTINGS if self.settings.get(k) is not None}
        self.shell = getattr(diffusers, self.pipeline_class)(**dict.fromkeys(_PIPELINE_COMPONENTS), **settings)
        self.layers = tuple(self.shell.text_encoder_select_layers)
        self.patch_size, self.is_distilled = self.shell.patch_size, bool(self.shell.config.is_distilled)
        self.tokens_per_latent = self.patch_size**2
        depth = parts.text_encoder.config.get_text_config().num_hidden_layers
        if max(self.layers) > depth or len(self.layers) != parts.denoiser.config.num_text_layers:
            raise ValueError(f"{self.pipeline_class} stacks hidden states {self.layers} of the text encoder ({depth} "
                             f"layers) for a transformer that reads {parts.denoiser.config.num_text_layers} "
                             "(num_text_layers)")  # fmt: skip
        self.max_sequence_length = min(pipeline_max_sequence_length(self.pipeline_class),
                                       parts.tokenizer.model_max_length)  # fmt: skip

    # --------------------------------------------------------------------------------------------- encoding
    def tokenize(self, parts: Components, prompts) -> list[torch.Tensor]:
        """``[input_ids, attention_mask]`` (B, 34 + max_sequence_length): prefix, prompt, padding, suffix."""
        shell, tokenizer = self.shell, parts.tokenizer
        text = tokenizer([shell.prompt_template_encode_prefix + p for p in prompts], truncation=True,
                         padding="max_length", return_tensors="pt",
                         max_length=self.max_sequence_length + shell.prompt_template_encode_start_idx
                         - shell.prompt_template_encode_num_suffix_tokens)  # fmt: skip
        suffix = tokenizer([shell.prompt_template_encode_suffix] * len(prompts), return_tensors="pt")
        return [torch.cat([text.input_ids, suffix.input_ids], 1),
                torch.cat([text.attention_mask, suffix.attention_mask], 1)]  # fmt: skip

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, mask = ids
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # padding takes no position
        out = parts.text_encoder(input_ids=input_ids, attention_mask=mask.bool(), output_hidden_states=True,
                                 position_ids=positions.unsqueeze(0).expand(3, -1, -1))  # fmt: skip
        start = self.shell.prompt_template_encode_start_idx
        states = torch.stack([out.hidden_states[i] for i in self.layers], dim=2)[:, start:]
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask[:, start:]}

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, C p p) (``_pack_latents``)."""
        b, c, h, w, p = *x.shape, self.patch_size
        return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The inverse of ``pack`` for latents of side ``h`` x ``w`` (``_unpack_latents`` without the frame axis)."""
        b, _, cpp, p = *tokens.shape, self.patch_size
        c = cpp // (p * p)
        return tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def denoise(self, denoiser, noisy, t, cond):
        _, _, h, w = noisy.shape
        states = cond.fields["encoder_hidden_states"]
        p = self.patch_size
        out = denoiser(
            hidden_states=self.pack(noisy),
            encoder_hidden_states=states,
            timestep=batch_timesteps(t, noisy) / 1000,
            position_ids=self.shell.prepare_position_ids(states.shape[1], h // p, w // p, noisy.device),
            encoder_attention_mask=cond.fields["encoder_attention_mask"].bool(),
            return_dict=False,
        )[0]
        return self.unpack(out, h, w)

    # ---------------------------------------------------------------------------------------- sizes
    def vae_scale_factor(self, parts: Components) -> int:
        return 2 ** len(parts.vae.config.temperal_downsample)  # the pipeline's

    def latent_size(self, parts: Components) -> int:
        return self.default_side // self.vae_scale_factor(parts)

    def resolution_multiple(self, parts: Components) -> int:
        return self.vae_scale_factor(parts) * self.patch_size  # the pipeline rounds other sizes up

    # ------------------------------------------------------------------------------------- sampling, export
    def pipeline_options(self) -> dict:
        return {"text_encoder_select_layers": self.layers, "is_distilled": self.is_distilled,
                "patch_size": self.patch_size}  # fmt: skip

    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        # lightning-ft's scale w is the pipeline's 1 + g (module docstring).
        return super().sample(module, pipe, inputs, seeds, steps, guidance - 1.0, negative_prompt)

    def usage_example(self, prompt: str, settings: str) -> str | None:
        # The card's settings give lightning-ft's w: the pipeline's guidance_scale is g = w - 1.
        settings = re.sub(r"guidance_scale=([-+.\deE]+)", lambda m: f"guidance_scale={float(m[1]) - 1.0!r}", settings)
        return super().usage_example(prompt, settings)

    def describe(self) -> str:
        return f"{self.name} (text-to-image, Qwen3-VL, {self.max_sequence_length} tokens)"
