"""Flow-matching transformer families: Stable Diffusion 3 / 3.5 and Flux.1 (trained by ``FlowMatchingProcess``).

SD3 / 3.5 (as ``StableDiffusion3Pipeline`` and diffusers' SD3 training scripts):
- two CLIP encoders with projection: penultimate hidden states concatenated on the feature axis and zero-padded to
  the T5 width, then T5's last hidden state appended on the sequence axis (``max_sequence_length`` tokens; without
  T5 those are zeros, as the pipeline does when ``text_encoder_3`` is absent);
- ``pooled_projections`` = both CLIP projections concatenated; the empty prompt is encoded like any other;
- the transformer is given 1000 sigma; training timesteps default to the logit-normal density (the scripts' default).

Flux.1 (as ``FluxPipeline`` and diffusers' Flux training scripts):
- CLIP's pooled output as ``pooled_projections``, T5's last hidden state (512 tokens) as the context, ``txt_ids``
  zeros and ``img_ids`` the (row, column) of each 2x2 latent patch;
- latents are packed 2x2 into tokens for the transformer and unpacked from its output;
- the transformer is given sigma (the pipeline divides its 1000-sigma timesteps by 1000), and the guidance value
  of the distilled models (``guidance_embeds``): ``Flux.guidance`` (3.5, the training scripts' default) in
  training, the sampling guidance scale when sampling, as the pipeline does;
- the scheduler's resolution-dependent shift applies (``use_dynamic_shifting``).
"""

from __future__ import annotations

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.families.stable_diffusion import StableDiffusion

FLOW = ("flow_matching",)


class StableDiffusion3(StableDiffusion):
    """SD3 / SD3.5: two CLIP encoders with projection and an optional T5, joint-attention transformer."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_argument = "transformer"
    pipeline_text_encoders = 3
    lora_prefix = "transformer"
    processes = FLOW
    default_timestep_density = "logit_normal"
    #: Joint attention (``attn``; SD3.5's extra self-attention ``attn2``).
    attention_names = ("attn", "attn2")
    #: T5 tokens of the context (the pipeline's default ``max_sequence_length``).
    max_sequence_length = 256

    def __init__(self, parts: Components):
        super().__init__(parts)
        self.tokenizer_keys = ("tokenizer", "tokenizer_2") + (("tokenizer_3",) if parts.tokenizer_3 else ())
        self.joint_dim = parts.denoiser.config.joint_attention_dim
        if parts.vae is not None and parts.vae.config.get("shift_factor") is None:
            # The SD3 / Flux pipelines decode with (latents / scale) + shift_factor and fail on None; a VAE made
            # for another family (e.g. SD's) has no shift: 0 is what it means, and what encode_images used.
            parts.vae.register_to_config(shift_factor=0.0)

    def tokenize(self, parts, prompts):
        # Both CLIP tokenizers pad to the first one's length (the pipeline's tokenizer_max_length); T5 to its own.
        ids = []
        for key in self.tokenizer_keys:
            tokenizer = getattr(parts, key)
            length = self.max_sequence_length if key == "tokenizer_3" else parts.tokenizer.model_max_length
            ids.append(
                tokenizer(
                    list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
                ).input_ids
            )
        return ids

    def encode_ids(self, parts, ids):
        states, pooled = [], []
        for encoder, tokens in zip((parts.text_encoder, parts.text_encoder_2), ids):
            out = encoder(tokens, output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, dim=-1)
        if parts.text_encoder_3 is not None:
            t5 = parts.text_encoder_3(ids[2])[0]
        else:
            t5 = clip.new_zeros(clip.shape[0], self.max_sequence_length, self.joint_dim)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "text_embeds": torch.cat(pooled, -1),
        }

    def denoise(self, denoiser, noisy, t, cond):
        return denoiser(
            hidden_states=noisy,
            timestep=t,
            encoder_hidden_states=cond.fields["encoder_hidden_states"],
            pooled_projections=cond.fields["text_embeds"],
        ).sample

    def resolution_multiple(self, parts):
        return self.vae_scale_factor(parts) * parts.denoiser.config.patch_size

    def pipeline_options(self) -> dict:
        return {}  # none of Stable Diffusion's safety-checker arguments

    def export(self, parts, scheduler, path) -> dict:
        record = super().export(parts, scheduler, path)
        if parts.text_encoder_3 is None and self.name == "sd3":
            # StableDiffusion3Pipeline requires its T5 slots: a model without T5 loads with them set to None
            # (diffusers' documented way of dropping T5), which the record tells the loader.
            record["pipeline_load"] = {"text_encoder_3": None, "tokenizer_3": None}
        return record

    def pipeline_call_kwargs(self, module) -> dict:
        side = module.native_resolution()
        return {"max_sequence_length": self.max_sequence_length, "height": side, "width": side}

    def default_lora_targets(self, denoiser):
        # diffusers' SD3 DreamBooth-LoRA default: both streams of the joint attention.
        return ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class Flux(StableDiffusion3):
    """Flux.1 (dev / schnell): CLIP pooled + T5 context, 2x2 packed latents with image and text ids."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    pipeline_text_encoders = 2
    default_timestep_density = "uniform"
    max_sequence_length = 512
    #: The guidance value a distilled (``guidance_embeds``) model is trained with (diffusers' Flux scripts: 3.5).
    guidance = 3.5
    #: The pipeline's default latent side (``FluxPipeline.default_sample_size``): Flux's config has no sample size.
    default_sample_size = 128

    def __init__(self, parts: Components):
        super().__init__(parts)
        self.tokenizer_keys = ("tokenizer", "tokenizer_2")
        self.guidance_embeds = bool(getattr(parts.denoiser.config, "guidance_embeds", False))

    def tokenize(self, parts, prompts):
        lengths = (parts.tokenizer.model_max_length, self.max_sequence_length)
        return [
            getattr(parts, key)(
                list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            ).input_ids
            for key, length in zip(self.tokenizer_keys, lengths)
        ]

    def encode_ids(self, parts, ids):
        pooled = parts.text_encoder(ids[0], output_hidden_states=False).pooler_output
        return {"encoder_hidden_states": parts.text_encoder_2(ids[1])[0], "text_embeds": pooled}

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token (``FluxPipeline._pack_latents``)."""
        b, c, h, w = latents.shape
        return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c4 = tokens.shape
        return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def denoise(self, denoiser, noisy, t, cond):
        b, _, h, w = noisy.shape
        context = cond.fields["encoder_hidden_states"]
        guidance = torch.full((b,), self.guidance, device=noisy.device) if self.guidance_embeds else None
        out = denoiser(
            hidden_states=self.pack(noisy),
            timestep=t / 1000,
            guidance=guidance,
            pooled_projections=cond.fields["text_embeds"],
            encoder_hidden_states=context,
            txt_ids=torch.zeros(context.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=self.image_ids(h, w, noisy.device, noisy.dtype),
        ).sample
        return self.unpack(out, h, w)

    def latent_size(self, parts):
        return self.default_sample_size

    def resolution_multiple(self, parts):
        return self.vae_scale_factor(parts) * 2

    def default_lora_targets(self, denoiser):
        # diffusers' Flux DreamBooth-LoRA targets (both attention streams, both feed-forwards) and the single
        # blocks' attention and MLP input (their q/k/v match the same names; proj_mlp exists only there).
        return (
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
        )  # fmt: skip
