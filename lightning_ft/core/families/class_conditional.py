"""Class-conditional and unconditional denoisers: DiT (latent transformer), class-conditional and plain UNets.

Sampling runs a plain loop over the diffusers scheduler (``denoise_loop``): class-conditional UNets have no
pipeline, and ``DiTPipeline`` hard-codes ImageNet's null class (1000). A DiT still exports as a ``DiTPipeline``
folder that plain diffusers samples with guidance: when the model has fewer than 1000 classes its label table is
padded so that row 1000 is its null row (``lightning_ft.core.dit_export``), and the export's ``lightning_ft.json``
records the real class count and null class, which this family reads back.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from lightning_ft.core.class_labels import resolve_null_class
from lightning_ft.core.components import Components
from lightning_ft.core.conditions import Condition
from lightning_ft.core.families.base import CLASS, NONE, ModelFamily, unit_images


@torch.no_grad()
def denoise_loop(parts: Components, scheduler, seeds: Sequence[int], steps: int, model_output) -> torch.Tensor:
    """The sampling loop over a diffusers scheduler, for models no diffusers pipeline drives; images in [0, 1].

    ``model_output(x, t)`` returns the (guided) model output for the batch ``x`` at timesteps ``t``. Image i starts
    from noise drawn by a generator seeded with ``seeds[i]``; the VAE, if any, decodes the result."""
    device = next(parts.denoiser.parameters()).device
    config = parts.denoiser.config
    channels = config.in_channels
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(channels, size, size, generator=g) for g in generators])
    x = x.to(device) * scheduler.init_noise_sigma
    # Stochastic samplers (DDPM, ancestral) draw fresh noise every step: from image i's own generator, as the
    # diffusers pipelines do, so that a sample depends on its seed only and not on the batch or the global RNG.
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        t_batch = torch.full((len(x),), int(t), device=device, dtype=torch.long)
        x = scheduler.step(model_output(x_in, t_batch), t, x, **step_kwargs).prev_sample
    if parts.vae is not None:
        shift = getattr(parts.vae.config, "shift_factor", None) or 0.0
        x = parts.vae.decode(x / parts.vae.config.scaling_factor + shift).sample
    return unit_images(x)


def guided(module, cond: Condition, uncond: Condition | None, guidance: float):
    """``model_output(x, t)`` for ``denoise_loop``: the module's prediction, with classifier-free guidance against
    ``uncond`` when it is given and ``guidance != 1`` (both branches in one batch)."""

    def model_output(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if uncond is None or guidance == 1.0:
            return module.predict(x, t, cond)
        both = module.predict(torch.cat([x, x]), torch.cat([t, t]), Condition.cat([cond, uncond]))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    return model_output


class ClassConditional(ModelFamily):
    """Class-conditional denoisers (DiT, UNets with ``num_class_embeds``): integer labels, a null class for
    guidance and condition dropout (the model's own null row, or ``model.null_class``)."""

    name = "class_conditional"
    kind = CLASS

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts)
        record = parts.declared.get("class_labels") or {}
        given = null_class if null_class is not None else record.get("null_class")
        self.null_class = resolve_null_class(parts.denoiser, given)
        self.num_classes = record.get("num_classes") or self._table_classes(parts.denoiser)
        self.is_dit = type(parts.denoiser).__name__ == "DiTTransformer2DModel"
        self.pipeline_class = "DiTPipeline" if self.is_dit and parts.vae is not None else None

    @staticmethod
    def _table_classes(denoiser) -> int | None:
        config = denoiser.config
        return getattr(config, "num_class_embeds", None) or getattr(config, "num_embeds_ada_norm", None)

    def classes(self) -> list[int]:
        """The real classes (the null class excluded)."""
        if not self.num_classes:
            raise ValueError("cannot tell how many classes this model has")
        return [c for c in range(self.num_classes) if c != self.null_class]

    def null_inputs(self, n: int) -> torch.Tensor:
        if self.null_class is None:
            raise ValueError("this class-conditional model has no null class: set model.null_class")
        return torch.full((n,), self.null_class, dtype=torch.long)

    def with_null(self, inputs: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        if self.null_class is None:
            raise ValueError("model.condition_dropout > 0 needs a null class: set model.null_class")
        return torch.where(drop.to(inputs.device), self.null_class, inputs)

    def encode(self, module, inputs, n, geometry):
        return Condition({"class_labels": torch.as_tensor(inputs).to(module.device)}, n)

    def denoise(self, denoiser, noisy, t, cond):
        return denoiser(noisy, t, class_labels=cond.fields["class_labels"]).sample

    def build_pipeline(self, parts, scheduler):
        if self.pipeline_class is None:
            return None
        from diffusers import DiTPipeline

        return DiTPipeline(transformer=parts.denoiser, vae=parts.vae, scheduler=scheduler)

    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        labels = torch.as_tensor(list(inputs))
        cond = module.encode_inputs(labels)
        uncond = module.encode_inputs(self.null_inputs(len(labels))) if self.null_class is not None else None
        scheduler = module.sampling_scheduler()
        return denoise_loop(module.parts, scheduler, seeds, steps, guided(module, cond, uncond, guidance))

    def export(self, parts, scheduler, path) -> dict:
        if self.pipeline_class is None:
            return super().export(parts, scheduler, path)
        from diffusers import DiTPipeline

        from lightning_ft.core.dit_export import dit_export_record, dit_pipeline_denoiser

        # A model loaded from such an export is padded already: row 1000 is its null row, as its own null class is.
        already = self._table_classes(parts.denoiser) == 1000
        padded = dit_pipeline_denoiser(parts.denoiser, null_class=None if already else self.null_class)
        DiTPipeline(transformer=padded, vae=parts.vae, scheduler=scheduler).save_pretrained(path)
        return {"class_labels": dit_export_record(self.num_classes, self.null_class)}


class Unconditional(ModelFamily):
    """Unconditional denoisers: a pixel-space UNet samples through ``DDIMPipeline``; a latent one through the loop."""

    name = "unconditional"
    kind = NONE

    def __init__(self, parts: Components):
        super().__init__(parts)
        self.pipeline_class = "DDIMPipeline" if parts.vae is None else None

    def build_pipeline(self, parts, scheduler):
        if self.pipeline_class is None:
            return None
        from diffusers import DDIMPipeline

        return DDIMPipeline(unet=parts.denoiser, scheduler=scheduler)

    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        if pipe is None:
            cond = Condition({}, len(seeds))
            scheduler = module.sampling_scheduler()
            return denoise_loop(module.parts, scheduler, seeds, steps, guided(module, cond, None, 1.0))
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        out = pipe(batch_size=len(seeds), generator=generators, num_inference_steps=steps, output_type="np").images
        return torch.from_numpy(out).permute(0, 3, 1, 2).float()
