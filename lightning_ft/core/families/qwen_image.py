"""Qwen-Image: a Qwen2.5-VL-conditioned double-stream transformer on a one-frame video VAE, by flow matching.

Conditions and sampling follow ``QwenImagePipeline`` (diffusers/pipelines/qwenimage/pipeline_qwenimage.py), training
diffusers' DreamBooth-LoRA script (examples/dreambooth/train_dreambooth_lora_qwen_image.py):

- prompts as ``encode_prompt``: each put into the pipeline's ``prompt_template_encode`` (a system turn asking to
  describe the image, the prompt as the user turn, the assistant turn opened), Qwen2.5-VL's last hidden state under
  the attention mask, each prompt's valid states without the first ``prompt_template_encode_start_idx`` (34: the
  system turn and ``<|im_start|>user\\n``), cut to ``max_sequence_length`` (the pipeline's 512, or the tokenizer's
  ``model_max_length`` when shorter). The pipeline pads states and mask to the longest prompt of its batch; the text
  cache keeps per-sample tensors of one length, so here the tokens are padded to 34 + ``max_sequence_length`` (the
  encoder is causal: the states kept are the pipeline's, whatever follows them) and the states zero-padded to
  ``max_sequence_length`` with their mask. ``denoise`` cuts a batch back to its longest prompt, with no mask when
  every token is valid, as ``encode_prompt`` returns them: the transformer gets the pipeline's very inputs (padded
  ones would change nothing: they are masked as keys, and only image tokens are read out). The empty prompt (null
  input, negative prompt) goes through the template like any other;
- latents as the script makes them: a draw from the VAE posterior of the images as one-frame clips (B, 3, 1, H, W),
  then ``(z - latents_mean) * (1 / latents_std)`` per channel; the frame axis is dropped (model space is 4-D), and
  the pipeline undoes both before decoding;
- the transformer gets 2x2-packed latents (``_pack_latents``), ``img_shapes`` [(1, H/2, W/2)] for its RoPE, the
  context and its mask, and sigma as the timestep (the pipeline's and script's ``t / 1000``);
- sigma: uniform (the script's ``weighting_scheme="none"``). Shift: the script loads the model's scheduler with
  ``shift=3.0``, but Qwen-Image's has ``use_dynamic_shifting``, and ``FlowMatchEulerDiscreteScheduler`` then builds
  its training table unshifted: the script trains at sigma = u. The pipeline samples at the resolution-dependent
  shift exp(mu), mu linear in the image tokens from ``base_shift`` to ``max_shift`` (about 2 at 1024 px).
  lightning-ft's default is the pipeline's shift, as for Flux here: a few-shot fine-tune spends its steps at the noise
  levels sampling visits. ``model.flow_shift: 1.0`` trains as the script does, ``3.0`` at the fixed shift it names;
- guidance: ``QwenImagePipeline`` guides with ``true_cfg_scale`` and a negative prompt (neg + w (pos - neg), rescaled
  to the conditional prediction's norm); its ``guidance_scale`` is for guidance-distilled transformers, which Qwen-Image
  is not (one with ``guidance_embeds`` is refused). lightning-ft's scale w is passed as ``true_cfg_scale=w`` with the
  negative prompt (default ``""``, the null input) when w > 1; w <= 1 samples unguided;
- LoRA on the script's default ``to_k, to_q, to_v, to_out.0`` (the image stream of the joint attention), saved by
  ``QwenImageLoraLoaderMixin`` under ``transformer``.
"""

from __future__ import annotations

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.families.base import (
    FLOW,
    TRANSFORMER_BNN_EXCLUDE,
    batch_timesteps,
    pack_2x2,
    pipeline_max_sequence_length,
    unpack_2x2,
)
from lightning_ft.core.families.text import SequenceLengthCall, TextFamily

_NOT_YET = "which lightning-ft does not train yet (QwenImagePipeline is)"
_IMAGE = f"it starts from an input image, {_NOT_YET}"
_EDIT_LATER = "which lightning-ft does not train yet (QwenImageEditPipeline is: the qwen_image_edit family)"
_PIPELINE_COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
#: Transformer settings of other Qwen-Image models (Edit-2511's zero_cond_t, Layered's extra timestep condition and 3-D
#: RoPE, a guidance-distilled one's guidance_embeds) that QwenImagePipeline never uses.
_VARIANT_SETTINGS = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds")


class QwenImageLatents:
    """Mixin of the families on Qwen-Image's video autoencoder (AutoencoderKLQwenImage): images are encoded as one-frame
    clips, and model space is ``(z - latents_mean) * (1 / latents_std)`` per channel with the frame axis dropped."""

    def vae_posterior(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        # A video autoencoder: images are one-frame clips (B, 3, 1, H, W), as the script collates them.
        return super().vae_posterior(vae, pixels.unsqueeze(2))

    def model_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """(z - latents_mean) * (1 / latents_std) per channel, as the script (the pipeline decodes z = x / (1 / std)
        + mean); the frame axis dropped."""
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device)
        inverse_std = (1.0 / torch.tensor(vae.config.latents_std).view(shape)).to(latents.device)
        return ((latents - mean) * inverse_std)[:, :, 0]

    def round_trip(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        return super().round_trip(vae, pixels.unsqueeze(2))[:, :, 0]


class QwenImage(QwenImageLatents, SequenceLengthCall, TextFamily):
    """Qwen-Image (module docstring): Qwen2.5-VL states of the templated prompt, 2x2-packed one-frame latents."""

    name = "qwen_image"
    pipelines = ("QwenImagePipeline",)
    pipeline_class = "QwenImagePipeline"
    refused = {
        "QwenImageEditPlusPipeline": "Qwen-Image-Edit-2509/2511 edits from several source images (each sized on its "
        f"own, in the VL prompt and as latents), {_EDIT_LATER}",
        "QwenImageEditInpaintPipeline": f"it inpaints a masked region of the source image, {_EDIT_LATER}",
        "QwenImageImg2ImgPipeline": _IMAGE,
        "QwenImageInpaintPipeline": _IMAGE,
        "QwenImageControlNetPipeline": "ControlNet training is not in lightning-ft yet",
        "QwenImageControlNetInpaintPipeline": "ControlNet training is not in lightning-ft yet",
        "QwenImageLayeredPipeline": f"Qwen-Image-Layered decomposes an input image into RGBA layers, {_NOT_YET}",
    }
    text_encoders = ("text_encoder",)
    #: The pipeline's components (a shell built from them, all None, gives its prompt template).
    pipeline_components = _PIPELINE_COMPONENTS
    lora_prefix = "transformer"
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    # BNN (inferred, as for the other transformers): the image stream of every block; not its adaLN modulation
    # (img_mod / txt_mod, the timestep's path) nor the text stream (the joint attention's add_* / to_add_out, txt_mlp).
    bnn_include = ("transformer_blocks.*",)
    bnn_exclude = (*TRANSFORMER_BNN_EXCLUDE, "*.img_mod.*", "*.txt_mod.*", "*.txt_mlp.*")
    fsdp_blocks = ("diffusers.models.transformers.transformer_qwenimage:QwenImageTransformerBlock",)
    #: The joint (text + image) attention of every block.
    attention_names = ("attn",)
    processes = FLOW
    default_timestep_density = "uniform"
    #: ``QwenImagePipeline.default_sample_size`` (latent side): the transformer's config has no sample size.
    default_sample_size = 128

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return type(parts.denoiser).__name__ == "QwenImageTransformer2DModel"

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        if parts.text_encoder is None or parts.vae is None or parts.vae.config.get("latents_mean") is None:
            raise ValueError("Qwen-Image needs its Qwen2.5-VL text encoder, tokenizer and AutoencoderKLQwenImage")
        variant = [k for k in _VARIANT_SETTINGS if parts.denoiser.config.get(k)]
        if variant:
            raise NotImplementedError(
                f"model: this QwenImageTransformer2DModel sets {', '.join(variant)}: not a Qwen-Image text-to-image "
                "transformer, which is what lightning-ft trains (QwenImagePipeline)"
            )
        import diffusers

        # The template and the count of its tokens to drop are set in the pipeline's __init__: read, not copied.
        shell = getattr(diffusers, self.pipeline_class)(**dict.fromkeys(self.pipeline_components))
        self.template, self.drop = shell.prompt_template_encode, shell.prompt_template_encode_start_idx
        self.max_sequence_length = min(pipeline_max_sequence_length(self.pipeline_class),
                                       parts.tokenizer.model_max_length)  # fmt: skip

    # --------------------------------------------------------------------------------------------- encoding
    def tokenize(self, parts: Components, prompts) -> list[torch.Tensor]:
        """``[input_ids, attention_mask]`` (B, 34 + max_sequence_length) of the templated prompts."""
        tokens = parts.tokenizer([self.template.format(p) for p in prompts], padding="max_length",
                                 max_length=self.drop + self.max_sequence_length, truncation=True,
                                 return_tensors="pt")  # fmt: skip
        return [tokens.input_ids, tokens.attention_mask]

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, mask = ids
        out = parts.text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        length = self.max_sequence_length
        # Per prompt, as _get_qwen_prompt_embeds and encode_prompt: the valid states, the template's dropped, cut.
        kept = [states[valid][self.drop :][:length] for states, valid in zip(out.hidden_states[-1], mask.bool())]
        states = torch.stack([torch.nn.functional.pad(s, (0, 0, 0, length - len(s))) for s in kept])
        positions = torch.arange(length, device=states.device)
        masks = torch.stack([positions < len(s) for s in kept]).long()
        return {"encoder_hidden_states": states, "encoder_attention_mask": masks}

    @staticmethod
    def context(cond) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's states and mask cut to its longest prompt; no mask when all are valid (``encode_prompt``)."""
        mask = cond.fields["encoder_attention_mask"]
        length = int(mask.sum(dim=1).max())
        states, mask = cond.fields["encoder_hidden_states"][:, :length], mask[:, :length]
        return states, None if bool(mask.all()) else mask

    def denoise(self, denoiser, noisy, t, cond):
        b, _, h, w = noisy.shape
        states, mask = self.context(cond)
        out = denoiser(
            hidden_states=pack_2x2(noisy),  # QwenImagePipeline._pack_latents: the same 2x2 layout
            timestep=batch_timesteps(t, noisy) / 1000,
            encoder_hidden_states=states,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
        ).sample
        return unpack_2x2(out, h, w)

    # ---------------------------------------------------------------------------------------- sizes
    def vae_scale_factor(self, parts: Components) -> int:
        return 2 ** len(parts.vae.config.temperal_downsample) if parts.vae is not None else 8  # the pipeline's

    def latent_size(self, parts: Components) -> int:
        return self.default_sample_size

    def resolution_multiple(self, parts: Components) -> int:
        return self.vae_scale_factor(parts) * 2  # 2x2 packing (the pipeline resizes other sizes)

    # ------------------------------------------------------------------------------------- sampling
    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        """True CFG at ``true_cfg_scale`` = guidance with the negative prompt (module docstring)."""
        guided = guidance > 1
        out = pipe(
            list(inputs.prompts),
            negative_prompt=[negative_prompt or ""] * len(inputs) if guided else None,
            true_cfg_scale=guidance,
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            output_type="pt",
            **self.pipeline_call_kwargs(module),
        ).images
        return out.float().clamp(0, 1)

    def describe(self) -> str:
        return f"{self.name} (text-to-image, Qwen2.5-VL, {self.max_sequence_length} tokens)"
