"""Joint-attention (MMDiT) flow-matching families: Stable Diffusion 3 / 3.5 and Flux.1, siblings under one base.

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
from lightning_ft.core.families.base import FLOW, TRANSFORMER_BNN_EXCLUDE, TRANSFORMER_BNN_INCLUDE, pack_2x2, unpack_2x2
from lightning_ft.core.families.text import SequenceLengthCall, TextFamily

_EDIT = "it conditions on a reference or control image, which lightning-ft does not train yet"


class JointTransformerFamily(SequenceLengthCall, TextFamily):
    """What SD3 and Flux.1 share: a joint-attention transformer on the flow-matching process, CLIP tokenizers padded
    to the first one's length and a T5 context of ``max_sequence_length`` tokens, LoRA in the ``transformer``
    layout, the transformer blocks as BNN's and FSDP's units. Their pipelines decode with ``shift_factor``, so a VAE
    made for another family (SD's, which has none) gets the 0 it means (``vae_defaults``)."""

    denoiser_argument = "transformer"
    lora_prefix = "transformer"
    processes = FLOW
    bnn_include = TRANSFORMER_BNN_INCLUDE
    bnn_exclude = TRANSFORMER_BNN_EXCLUDE
    vae_defaults = {"shift_factor": 0.0}
    #: Joint attention (``attn``; SD3.5's extra self-attention ``attn2``).
    attention_names = ("attn", "attn2")
    #: The tokenizer of the T5 context and its length (the pipeline's default ``max_sequence_length``).
    t5_tokenizer: str = ""
    max_sequence_length: int = 256

    def token_length(self, parts: Components, key: str) -> int:
        # The CLIP tokenizers pad to the first one's length (the pipelines' tokenizer_max_length); T5 to its own.
        return self.max_sequence_length if key == self.t5_tokenizer else parts.tokenizer.model_max_length


class StableDiffusion3(JointTransformerFamily):
    """SD3 / SD3.5: two CLIP encoders with projection and an optional T5, joint-attention transformer."""

    name = "sd3"
    pipelines = ("StableDiffusion3Pipeline",)
    pipeline_class = "StableDiffusion3Pipeline"
    refused = {
        "StableDiffusion3Img2ImgPipeline": _EDIT,
        "StableDiffusion3InpaintPipeline": _EDIT,
        "StableDiffusion3ControlNetPipeline": "ControlNet training is not in lightning-ft yet",
    }
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    t5_tokenizer = "tokenizer_3"
    default_timestep_density = "logit_normal"
    # diffusers' SD3 DreamBooth scripts default to --precondition_outputs 1 (the loss on the implied x0).
    precondition_outputs = True
    fsdp_blocks = ("diffusers.models.attention:JointTransformerBlock",)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return type(parts.denoiser).__name__ == "SD3Transformer2DModel"

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        self.joint_dim = parts.denoiser.config.joint_attention_dim

    def encode_ids(self, parts, ids):
        states, pooled = [], []
        for encoder, tokens in zip((parts.text_encoder, parts.text_encoder_2), ids):
            out = encoder(tokens, output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, dim=-1)
        if parts.text_encoder_3 is not None:
            t5 = parts.text_encoder_3(ids[2])[0]
        else:  # the pipeline's zeros when T5 is dropped
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

    def export(self, parts, scheduler, path) -> dict:
        record = super().export(parts, scheduler, path)
        if parts.text_encoder_3 is None:
            # StableDiffusion3Pipeline requires its T5 slots: a model without T5 loads with them set to None
            # (diffusers' documented way of dropping T5), which the record tells the loader.
            record["pipeline_load"] = {"text_encoder_3": None, "tokenizer_3": None}
        return record


class Flux(JointTransformerFamily):
    """Flux.1 (dev / schnell): CLIP pooled + T5 context, 2x2 packed latents with image and text ids."""

    name = "flux"
    pipelines = ("FluxPipeline",)
    pipeline_class = "FluxPipeline"
    refused = {
        "FluxFillPipeline": _EDIT,
        "FluxControlPipeline": _EDIT,
        "FluxImg2ImgPipeline": _EDIT,
        "FluxInpaintPipeline": _EDIT,
        "FluxControlNetPipeline": "ControlNet training is not in lightning-ft yet",
        "FluxPriorReduxPipeline": _EDIT,
    }
    text_encoders = ("text_encoder", "text_encoder_2")
    t5_tokenizer = "tokenizer_2"
    max_sequence_length = 512
    fsdp_blocks = (
        "diffusers.models.transformers.transformer_flux:FluxTransformerBlock",
        "diffusers.models.transformers.transformer_flux:FluxSingleTransformerBlock",
    )
    # diffusers' Flux DreamBooth-LoRA targets (both attention streams, both feed-forwards) and the single blocks'
    # attention and MLP input (their q/k/v match the same names; proj_mlp exists only there).
    lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
    )  # fmt: skip
    #: ``save_pretrained(lora_format="kohya")`` writes sd-scripts' Flux layout: BFL layer names, q/k/v fused
    #: (``lightning_ft.core.lora_formats.flux_to_kohya``), which ComfyUI and Forge read.
    kohya_lora = "flux"
    #: The guidance value a distilled (``guidance_embeds``) model is trained with (diffusers' Flux scripts: 3.5).
    guidance = 3.5
    #: The pipeline's default latent side (``FluxPipeline.default_sample_size``): Flux's config has no sample size.
    default_sample_size = 128

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return type(parts.denoiser).__name__ == "FluxTransformer2DModel"

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        config = parts.denoiser.config
        if config.get("out_channels") not in (None, config.in_channels):
            raise NotImplementedError(
                f"model: this FluxTransformer2DModel takes {config.in_channels} input channels for "
                f"{config.out_channels} output channels: a Fill / Control (image-conditioned) Flux, "
                "which lightning-ft does not train yet"
            )
        self.guidance_embeds = bool(getattr(parts.denoiser.config, "guidance_embeds", False))

    def encode_ids(self, parts, ids):
        pooled = parts.text_encoder(ids[0], output_hidden_states=False).pooler_output
        return {"encoder_hidden_states": parts.text_encoder_2(ids[1])[0], "text_embeds": pooled}

    pack = staticmethod(pack_2x2)
    unpack = staticmethod(unpack_2x2)

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
