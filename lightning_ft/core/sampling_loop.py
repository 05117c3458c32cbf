"""The sampling loop over a diffusers scheduler, for models no diffusers pipeline drives (class-conditional UNets,
DiTs with fewer than ImageNet's classes, latent unconditional UNets, ANL's conditioned denoiser)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.conditions import Condition


def unit_images(images: torch.Tensor) -> torch.Tensor:
    """Decoded images in [-1, 1] to [0, 1] floats."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


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
