"""FLUX.1 Kontext: Flux.1 that edits a source image, its latents packed as tokens beside the target's.

Conditions and sampling follow ``FluxKontextPipeline`` (diffusers/pipelines/flux/pipeline_flux_kontext.py), training
diffusers' DreamBooth-LoRA script for it (examples/dreambooth/train_dreambooth_lora_flux_kontext.py, image-to-image
with ``--cond_image_column``). Everything of Flux.1 holds (``joint_transformer.Flux``: CLIP pooled + T5 context, 2x2
packed latents, sigma timesteps, the distilled guidance 3.5 in training, the resolution-dependent shift); what Kontext
adds:

- every training image pairs with a source image (``data.source_dir``, or a ``cond_image`` field in the captions file),
  cropped and flipped with it; the condition holds the source's latents: the VAE posterior's mode (the script's
  default ``--vae_encode_mode mode``, and the pipeline's ``sample_mode="argmax"``) of the source in [-1, 1], then
  ``(z - shift_factor) * scaling_factor``;
- the transformer reads the target's packed noisy tokens followed by the source's packed tokens; the position ids are
  the target's (0, row, column) followed by the source's (1, row, column) (``_prepare_latent_image_ids`` with the first
  axis set to 1); its output is cut to the target's tokens and unpacked (the script's and the pipeline's
  ``noise_pred[:, : latents.size(1)]``);
- the null input (condition dropout, a negative prompt) is the empty prompt with the same source image: an edit of
  nothing is still an edit of that image;
- sampling passes the sources as ``image`` (tensors in [0, 1]), ``_auto_resize=False`` (the pipeline would resize a
  source to one of Kontext's preferred ~1 Mpx resolutions, which it was pretrained at: a fine-tune on pairs of another
  size keeps their size) and the samples at the sources' size with ``max_area`` = their area (the pipeline rescales
  the output to ``max_area``, 1024 x 1024 by default);
- the target latents are a posterior draw (lightning-ft's rule for every family); the script takes the mode for them
  too (``--vae_encode_mode mode``): the loss test shows the two agree given the same latents;
- prior preservation is refused with source images, as the script refuses it ("Prior preservation isn't supported
  with I2I training"): class images have no source. Diff-Tuning is refused (its memory bank is the pretrained model's
  samples from the null input, and an editing model has no sample without a source image).
"""

from __future__ import annotations

import torch

from lightning_ft.core.families.joint_transformer import Flux
from lightning_ft.core.families.text import TextFamily

_INPAINT = ("it inpaints a masked region of the source image, which lightning-ft does not train yet "
            "(FluxKontextPipeline is)")


class FluxKontext(Flux):
    """FLUX.1 Kontext (module docstring): Flux.1 with the source image's latents as extra tokens."""

    name = "flux_kontext"
    pipelines = ("FluxKontextPipeline",)
    pipeline_class = "FluxKontextPipeline"
    refused = {"FluxKontextInpaintPipeline": _INPAINT}
    task = "image editing"
    hub_task = "image-to-image"
    needs_source = True
    #: After Flux: a bare FluxTransformer2DModel built from configs is Flux.1 (Kontext's has the same architecture;
    #: its folders name FluxKontextPipeline, a config-built one sets ``model.family: flux_kontext``).
    detect_order = 101

    # ---------------------------------------------------------------------------------------------- editing
    def encode_sources(self, module, condition, inputs, sources):
        """The source latents: the posterior's mode of the sources in [-1, 1], in model space (module docstring)."""
        latents = module.encode_images(sources * 2 - 1, sample=False)
        return condition.replace(source_latents=latents)

    def retention_inputs(self, count, prompts=None):
        raise ValueError(
            "Diff-Tuning: the memory bank is sampled from the pretrained model with the null input, and an editing "
            f"model ({self.name}) samples only from a source image: Diff-Tuning does not apply"
        )

    @staticmethod
    def source_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        """The source tokens' position ids: (1, row, column) per 2x2 patch (the pipeline's ``image_ids``)."""
        ids = Flux.image_ids(h, w, device, dtype)
        ids[:, 0] = 1
        return ids

    def denoise(self, denoiser, noisy, t, cond):
        b, _, h, w = noisy.shape
        source = cond.fields["source_latents"].to(noisy.dtype)
        sh, sw = source.shape[-2:]
        context = cond.fields["encoder_hidden_states"]
        guidance = torch.full((b,), self.guidance, device=noisy.device) if self.guidance_embeds else None
        tokens = self.pack(noisy)
        out = denoiser(
            hidden_states=torch.cat([tokens, self.pack(source)], dim=1),
            timestep=t / 1000,
            guidance=guidance,
            pooled_projections=cond.fields["text_embeds"],
            encoder_hidden_states=context,
            txt_ids=torch.zeros(context.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=torch.cat([self.image_ids(h, w, noisy.device, noisy.dtype),
                               self.source_ids(sh, sw, noisy.device, noisy.dtype)]),  # fmt: skip
        ).sample
        return self.unpack(out[:, : tokens.shape[1]], h, w)

    # ------------------------------------------------------------------------------------------- sampling
    def control_call_kwargs(self, module, inputs) -> dict:
        """The pipeline's ``image`` (the sources, tensors in [0, 1]), kept at their size (``_auto_resize=False``), and
        the samples at that size (``height``, ``width``, ``max_area``)."""
        if inputs.sources is None:
            raise ValueError(f"generate: the {self.name} family is an editing model: give sources (one source image "
                             "per sample, (N, 3, H, W) in [0, 1])")  # fmt: skip
        images = torch.stack(list(inputs.sources))
        h, w = images.shape[-2:]
        return {"image": images, "_auto_resize": False, "height": h, "width": w, "max_area": h * w}

    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        kwargs = {**self.pipeline_call_kwargs(module), **self.control_call_kwargs(module, inputs)}
        out = pipe(
            prompt=list(inputs.prompts),  # the pipeline's first argument is the image
            num_inference_steps=steps,
            guidance_scale=guidance,
            negative_prompt=self.negative_inputs(negative_prompt, len(inputs)),
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            output_type="pt",
            **kwargs,
        ).images
        return out.float().clamp(0, 1)

    def usage_example(self, prompt: str, settings: str) -> str | None:
        call = TextFamily.usage_example(self, prompt, settings)
        return call.replace("pipe(", "pipe(image=source_image, prompt=", 1)
