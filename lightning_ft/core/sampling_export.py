"""Sampling and export for ``DiffusionBase``: the diffusers pipeline of the current weights, ``generate`` and
``save_pretrained`` (full pipeline, or LoRA weights for ``load_lora_weights``).

Kept apart from the training logic of ``base.py``; both read the same components through ``self.parts``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_ft.core import lora_formats
from lightning_ft.core import pipeline as pipe_utils
from lightning_ft.core.trainable import has_lora, lora_state_dict, merged_copy
from lightning_ft.metrics.backbones import DECLARATION, model_backbones, write_declaration


class SamplingExportMixin:
    """Sampling (``generate``) and export (``save_pretrained``) of a ``DiffusionBase``; needs ``parts``, ``family``,
    ``hparams``, ``predict``, ``noise_scheduler`` and ``sampling_weights()`` from it."""

    def sampling_scheduler(self):
        h = self.hparams
        source = getattr(self.noise_process, "model_scheduler", self.noise_scheduler)
        return pipe_utils.sampling_scheduler(source, h.sample_scheduler, h.sample_scheduler_kwargs)

    def sampling_settings(
        self, n: int, seeds: Sequence[int] | None, steps: int | None, guidance_scale: float | None
    ) -> tuple[int, float, list[int]]:
        """``generate``'s defaults: the model's steps and guidance when not given, seeds 0..n-1 (checked against n)."""
        steps = steps or self.hparams.sample_steps
        guidance = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        seeds = list(range(n)) if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"generate: {len(seeds)} seeds for {n} images")
        return steps, guidance, seeds

    def exported_scheduler(self):
        """The sampling scheduler exactly as an export holds it: diffusers pipelines normalise some scheduler
        settings when built (StableDiffusionPipeline sets ``steps_offset=1``), so a sampler that drives the
        denoiser itself must start from the pipeline's scheduler to match the exported model."""
        pipe = self.build_pipeline()
        return pipe.scheduler if pipe is not None else self.sampling_scheduler()

    def build_pipeline(self):
        """The diffusers pipeline of the current weights (shares the modules; nothing is copied), or None when no
        pipeline fits the family."""
        return self.family.build_pipeline(self.parts, self.sampling_scheduler())

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | None = None,
        labels: Sequence[int] | None = None,
        seeds: Sequence[int] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 32,
        negative_prompt: str | None = None,
        controls: torch.Tensor | None = None,
        sources: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample images in [0, 1], shape (N, C, H, W), one per prompt / label / seed.

        ``seeds[i]`` seeds image i alone, so a sample does not depend on the batch it was drawn in. ``controls``:
        one control image per sample, (N, 3, H, W) in [0, 1], for a model with a ControlNet (the samples then have
        the controls' size). ``sources``: one source image per sample, (N, 3, H, W) in [0, 1], for an editing model
        (the image each sample is an edit of)."""
        n = len(prompts) if prompts is not None else len(labels) if labels is not None else len(seeds or [])
        steps, guidance, seeds = self.sampling_settings(n, seeds, steps, guidance_scale)
        inputs = self.family.sample_inputs(prompts, labels, n)
        if controls is not None:
            inputs = self.family.with_controls(inputs, controls, self.controlnet is not None)
        if sources is not None:
            inputs = self.family.with_sources(inputs, sources)
        chunks = []
        with self.sampling_weights():
            pipe = self.build_pipeline()
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
            for start in range(0, n, batch_size):
                part = slice(start, start + batch_size)
                chunk = inputs[part]
                chunks.append(self.family.sample(self, pipe, chunk, seeds[part], steps, guidance, negative_prompt))
        return torch.cat(chunks).cpu()

    @torch.no_grad()
    def round_trip(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images in [0, 1] (N, 3, H, W) encoded by the model's autoencoder (posterior mode) and decoded again, in
        [0, 1] on the CPU; a copy for a pixel-space model. No sample can resemble an image more than its round trip
        does, so the round trip of the instance images is the ceiling of every fidelity score."""
        if self.vae is None:
            return images.detach().float().cpu().clone()
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(self.device, self.vae.dtype) * 2 - 1
            out.append(((self.family.round_trip(self.vae, x).float() + 1) / 2).clamp(0, 1).cpu())
        return torch.cat(out)

    def save_pretrained(self, path: str | Path, lora_only: bool = False, lora_format: str = "diffusers") -> Path:
        """Write a diffusers folder (full pipeline) or, with ``lora_only``, LoRA weights for ``load_lora_weights``.

        ``lora_format`` is the layout of the LoRA-only file (``lightning_ft.core.lora_formats``): ``diffusers`` (the
        family's ``save_lora``) or ``kohya`` (one ``lora_kohya.safetensors`` in kohya-ss' layout, which ComfyUI and
        AUTOMATIC1111 load; SD1.x/2.x, SDXL and Flux.1, plain LoRA only). The folder's ``lightning_ft.json`` records
        it (``lora`` record: format, file).

        A full export of a LoRA model writes the merged weights: the folder has exactly the base architecture. A
        model with a quantised base (``model.quantize``) writes the LoRA only, whatever ``lora_only`` says, with a
        warning and a record in the folder's ``lightning_ft.json``: nothing is merged into a quantised base."""
        quantize = self.hparams.get("quantize", "none")
        if quantize != "none" and not lora_only:
            warnings.warn(
                f"save_pretrained({str(path)!r}): model.quantize={quantize!r}: the base is quantised, so the export "
                "writes the LoRA weights only (as lora_only=True) and merges nothing; load them on the pretrained "
                f"base {self.hparams.get('pretrained')!r}. A full pipeline needs a run with model.quantize='none'",
                stacklevel=2,
            )
            lora_only = True
        # Refused before anything is written: a format the family has no layout for, a kohya file of a full export.
        lora_formats.check_lora_format(lora_format, self.family)
        if lora_format != "diffusers" and not lora_only:
            raise ValueError(
                f"save_pretrained(lora_format={lora_format!r}) writes a LoRA file: it needs lora_only=True (a full "
                "export is a diffusers pipeline with the LoRA merged in)"
            )
        if lora_only and not has_lora(self.denoiser):
            raise ValueError("save_pretrained(lora_only=True) needs model.trainable='lora'")
        if lora_format == "kohya":
            lora_formats.check_kohya_adapter(self.denoiser)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with self.sampling_weights():
            if lora_only:
                state = self.exportable_lora_state()
                (path / DECLARATION).unlink(missing_ok=True)  # a record of an earlier export there is not this one's
                if lora_format == "kohya":
                    file = lora_formats.save_kohya_lora(path, self.family, state, self.denoiser)
                    record = {"lora": lora_formats.kohya_record(file.name)}
                else:
                    metadata = next(iter(self.denoiser.peft_config.values())).to_dict()
                    self.family.save_lora(path, self.denoiser, state, metadata)
                    # A family that writes another file (a PEFT folder) records it itself, which stays.
                    record = {"lora": {"format": "diffusers"}, **lora_formats.read_record(path)}
                if quantize != "none":  # what the folder is and is not, for whoever loads it
                    from lightning_ft.core.quantize import export_record

                    record.update(export_record(quantize, self.hparams.get("pretrained"), self.quantized_base))
                write_declaration(model_backbones(self), path, record)
                return path
            parts = self.parts
            parts.denoiser = self.exportable_denoiser()
            record = self.family.export(parts, self.sampling_scheduler(), path)
            length = self.hparams.get("max_sequence_length")
            if length is not None:  # the pipeline must be called with it (its default is another)
                record = {**record, "pipeline_call": {**record.get("pipeline_call", {}), "max_sequence_length": length}}
        # The metric backbones the model declares (its own argument, or its pretrained folder's) go with it, and
        # what the family records (a DiT export's real class count and null class).
        write_declaration(model_backbones(self), path, record)
        return path

    def exportable_lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights in the layout ``load_lora_weights`` reads; methods that reparameterise LoRA override it."""
        return lora_state_dict(self.denoiser)

    def exportable_denoiser(self) -> torch.nn.Module:
        """The denoiser as plain diffusers weights (LoRA merged into a copy). Must not change ``self``: training
        and sampling go on after an export. Methods that insert or reparameterise layers override it."""
        quantize = self.hparams.get("quantize", "none")
        if quantize != "none":  # PEFT would add the LoRA to packed int8/fp8/nf4 data, or refuse to
            raise ValueError(f"model.quantize={quantize!r}: a LoRA is never merged into a quantised base; export "
                             "the LoRA (save_pretrained writes it alone)")  # fmt: skip
        return merged_copy(self.denoiser) if has_lora(self.denoiser) else self.denoiser
