"""Ideogram 4: a Qwen3-VL-conditioned single-stream transformer and a frozen unconditional twin, by flow matching.

Conditions and sampling follow ``Ideogram4Pipeline`` (diffusers/pipelines/ideogram4/pipeline_ideogram4.py), training
diffusers' DreamBooth-LoRA script (examples/dreambooth/train_dreambooth_lora_ideogram4.py):

- two denoisers: the conditional ``transformer`` (text and image tokens in one packed sequence), the one the script
  trains (LoRA), and the ``unconditional_transformer`` (image tokens alone, zero text features), which the script and
  lightning-ft keep frozen: a family ``frozen_components`` entry, held beside the denoiser, passed to the pipeline,
  written by the full export unchanged. Guidance blends the two: v = w v_cond + (1 - w) v_uncond, lightning-ft's
  scale w as the pipeline's constant ``guidance_scale`` (``guidance_schedule=None``); it has no negative prompt;
- prompts as ``encode_prompt``: each one a user message through the tokenizer's chat template (content as a list of
  text parts), tokenised alone without special tokens, left-padded to ``max_sequence_length`` (the pipeline's 2048,
  or the tokenizer's ``model_max_length`` when shorter; a longer prompt is refused, as the pipeline refuses it).
  Features: the hidden states of the Qwen3-VL decoder layers ``QWEN3_VL_ACTIVATION_LAYERS`` side by side (the
  pipeline's own ``_get_text_encoder_hidden_states``), zero on the padding, with the mask. The empty prompt (null
  input, condition dropout) goes through the template like any other and conditions the *conditional* transformer:
  the pipeline's unconditional branch is the frozen twin, so condition dropout does not change guidance;
- the transformer gets ``[text positions, image tokens]``: zero latents on the text positions, the text features on
  the text positions, ``position_ids`` / ``segment_ids`` / ``indicator`` of the pipeline's ``_prepare_ids``, and the
  model time 1 - sigma. Image tokens never attend to the left padding (another segment, disjoint positions), so a
  batch is cut to its longest prompt; the output's image tokens (x0 - eps, as the script's target) are negated to the
  framework's eps - x0;
- model space as the script's ``patchify_latents``: the posterior's mode, 2x2 patches with channels ordered (row,
  column, latent channel), normalised by the VAE's batch-norm statistics (the pipeline undoes both to decode);
- timesteps: the script draws sigma itself, logit-normal with mean 0.5 log(pixels / 512^2) (the pipeline's
  ``_resolution_aware_mu``) and std 1.5: the pipeline's sampling schedule. Logit-normal(m, s) is logit-normal(0, s)
  under the time shift e^m, so the defaults here are the ``logit_normal`` density, std 1.5 and that shift of the
  images' size (``flow_shift_rule``): where the script trains, on lightning-ft's 1000-step grid of u.
  ``model.flow_shift`` fixes another shift; no loss weighting (``compute_loss_weighting_for_sd3`` of logit_normal
  is 1);
- LoRA on the script's default ``to_q, to_k, to_v, to_out.0, w1, w2, w3``, saved by ``Ideogram4LoraLoaderMixin``
  under ``transformer`` (it loads into the conditional transformer only).
"""

from __future__ import annotations

import functools

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.families.base import FLOW, batch_timesteps, pipeline_max_sequence_length
from lightning_ft.core.families.text import SequenceLengthCall, TextFamily

_MODULE = "diffusers.models.transformers.transformer_ideogram4"


def _schedule_mu(token_side: int, shape) -> float:
    """The pipeline's ``_resolution_aware_mu`` (base 0) of latents of ``shape`` (model space: one pixel a token)."""
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _resolution_aware_mu

    return _resolution_aware_mu(shape[-2] * token_side, shape[-1] * token_side, base_mu=0.0)


class Ideogram4(SequenceLengthCall, TextFamily):
    """Ideogram 4 (module docstring): Qwen3-VL layer states, a packed text + image sequence, a frozen unconditional
    transformer for guidance."""

    name = "ideogram4"
    pipelines = ("Ideogram4Pipeline",)
    pipeline_class = "Ideogram4Pipeline"
    refused = {
        "Ideogram4ModularPipeline": "a modular pipeline (blocks assembled at run time), which lightning-ft does not "
        "train; load the model's Ideogram4Pipeline folder",
    }
    frozen_components = ("unconditional_transformer",)
    lora_prefix = "transformer"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
    # BNN (inferred, as for the other transformers): the blocks' attention and feed-forward; not their adaLN
    # modulation (the timestep's path), nor the embedders and final layer outside the blocks.
    bnn_include = ("layers.*",)
    bnn_exclude = ("*.adaln_modulation",)
    fsdp_blocks = (f"{_MODULE}:Ideogram4TransformerBlock",)
    #: Each block's self-attention over the packed text and image tokens.
    attention_names = ("attention",)
    #: Its own scalar embedder of the model time (not a diffusers TimestepEmbedding), which A3FTA's adapters read.
    time_embedding = "t_embedding"
    processes = FLOW
    default_timestep_density = "logit_normal"  # the script's --weighting_scheme default, its --logit_std
    default_logit_std = 1.5
    tokens_per_latent = 1  # model space is already patchified: one latent pixel, one token
    #: The pipeline's default side (``height=2048``): the transformer's config has no sample size.
    default_side = 2048
    patch = 2

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return type(parts.denoiser).__name__ == "Ideogram4Transformer2DModel"

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        from diffusers.pipelines.ideogram4.pipeline_ideogram4 import QWEN3_VL_ACTIVATION_LAYERS

        if parts.text_encoder is None or parts.tokenizer is None or parts.vae is None:
            raise ValueError("Ideogram 4 needs its Qwen3-VL text encoder, tokenizer and AutoencoderKLFlux2")
        depth = parts.text_encoder.config.get_text_config().num_hidden_layers
        if max(QWEN3_VL_ACTIVATION_LAYERS) >= depth:
            raise ValueError(f"Ideogram4Pipeline reads decoder layers {QWEN3_VL_ACTIVATION_LAYERS}: the text encoder "
                             f"has {depth}")  # fmt: skip
        self.default_length = pipeline_max_sequence_length(self.pipeline_class)
        self.max_sequence_length = min(self.default_length, parts.tokenizer.model_max_length)

    # --------------------------------------------------------------------------------------------- encoding
    def tokenize(self, parts: Components, prompts) -> list[torch.Tensor]:
        """``[input_ids, attention_mask]`` (B, max_sequence_length), left-padded (``encode_prompt``)."""
        length = self.max_sequence_length
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            text = parts.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            tokens = parts.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
            if len(tokens) > length:
                raise ValueError(f"a prompt of {len(tokens)} tokens (with the chat template) is over "
                                 f"max_sequence_length={length}, as Ideogram4Pipeline refuses: {prompt!r}")  # fmt: skip
            ids[row, length - len(tokens) :] = tokens
            mask[row, length - len(tokens) :] = 1
        return [ids, mask]

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        from diffusers import Ideogram4Pipeline

        input_ids, mask = ids
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0) * mask  # 0.. on the prompt, 0 on the padding
        layers = Ideogram4Pipeline._get_text_encoder_hidden_states(parts.text_encoder, input_ids, mask, positions)
        b, length = input_ids.shape
        features = torch.stack(layers, dim=0).permute(1, 2, 3, 0).reshape(b, length, -1)  # as encode_prompt
        return {"encoder_hidden_states": features * mask[..., None].to(features.dtype), "encoder_attention_mask": mask}

    def denoise(self, denoiser, noisy, t, cond):
        from diffusers import Ideogram4Pipeline

        b, c, h, w = noisy.shape
        mask = cond.fields["encoder_attention_mask"]
        lengths = mask.sum(dim=1)
        text = int(lengths.max())  # the longest prompt; shorter ones keep their left padding
        states = cond.fields["encoder_hidden_states"][:, mask.shape[1] - text :]
        positions, segments, indicator = Ideogram4Pipeline._prepare_ids(lengths.tolist(), h, w, text, noisy.device)
        tokens = noisy.flatten(2).transpose(1, 2)  # (B, h * w, C), row-major as the pipeline's grid
        out = denoiser(
            hidden_states=torch.cat([tokens.new_zeros(b, text, c), tokens], dim=1),
            timestep=(1 - batch_timesteps(t, noisy).float() / 1000).to(noisy.dtype),  # the pipeline's 1 - t / 1000
            encoder_hidden_states=torch.cat([states, states.new_zeros(b, h * w, states.shape[-1])], dim=1),
            position_ids=positions,
            segment_ids=segments,
            indicator=indicator,
            return_dict=False,
        )[0]
        return -out[:, text:].transpose(1, 2).reshape(b, c, h, w)  # x0 - eps -> the framework's eps - x0

    # ------------------------------------------------------------------------------------------- latent space
    def vae_posterior(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """The script trains on the posterior's mode (``latent_dist.mode()``), not a draw: zero spread."""
        mode = vae.encode(pixels).latent_dist.mode()
        return torch.stack([mode, torch.zeros_like(mode)], dim=1)

    def model_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """``patchify_latents`` then ``(z - bn_mean) / bn_std``, as (B, 4C, H/2, W/2), channels (row, column, C)."""
        b, c, h, w = latents.shape
        p = self.patch
        patches = latents.view(b, c, h // p, p, w // p, p).permute(0, 3, 5, 1, 2, 4)  # (b, row, column, c, h, w)
        patches = patches.reshape(b, p * p * c, h // p, w // p)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patches)
        return (patches - mean) / std

    def flow_shift_rule(self, parts: Components):
        """The script's and pipeline's logit-normal mean 0.5 log(pixels / 512^2), as a shift exponent."""
        return functools.partial(_schedule_mu, self.vae_scale_factor(parts) * self.patch)

    # ---------------------------------------------------------------------------------------- sizes
    def latent_size(self, parts: Components) -> int:
        return self.default_side // self.vae_scale_factor(parts)

    def resolution_multiple(self, parts: Components) -> int:
        return self.vae_scale_factor(parts) * self.patch  # check_inputs: sides divisible by vae_scale_factor * 2

    # ------------------------------------------------------------------------------------- sampling, export
    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        if negative_prompt:
            raise ValueError("Ideogram4Pipeline takes no negative prompt (its unconditional transformer reads no text)")
        out = pipe(
            list(inputs.prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            guidance_schedule=None,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            output_type="pt",
            **self.pipeline_call_kwargs(module),
        ).images
        return out.float().clamp(0, 1)

    def usage_example(self, prompt: str, settings: str) -> str | None:
        # A guidance_scale replaces the pipeline's default guidance_schedule, which must then be None.
        return super().usage_example(prompt, ", ".join(s for s in (settings, "guidance_schedule=None") if s))

    def describe(self) -> str:
        return f"{self.name} (text-to-image, Qwen3-VL, {self.max_sequence_length} tokens)"
