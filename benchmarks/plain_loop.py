"""A plain PyTorch DreamBooth training loop: the same math as ``lightning_ft.methods.DreamBooth`` written out by hand
with diffusers and torch calls, as diffusers' ``train_dreambooth.py`` does. It is the reference that
``benchmarks/overhead.py`` times the framework against; ``tests/benchmarks/test_plain_loop.py`` checks that its loss
and its update equal the module's for the same batch and random state.

Random numbers are drawn in the module's order (VAE latent, timesteps, noise), so both give the same loss.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler


class PlainDreamBooth:
    """A copy of ``module``'s denoiser trained by a hand-written loop over ``batches`` (any iterable of the
    data module's batches), with the module's frozen VAE and text encoder, noise schedule and AdamW settings
    (``copy_denoiser=False``: train the module's denoiser itself)."""

    def __init__(self, module, batches, total_steps: int = 1, copy_denoiser: bool = True):
        h = module.hparams
        self.device = module.device
        self.unet = (copy.deepcopy(module.denoiser) if copy_denoiser else module.denoiser).train()
        self.vae, self.text_encoder, self.tokenizer = module.vae, module.text_encoder, module.tokenizer
        self.scheduler = module.noise_scheduler
        self.prior_loss_weight = h.prior_loss_weight
        params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay,
                                           eps=h.adam_eps)  # fmt: skip
        self.lr_schedule = get_scheduler(h.lr_scheduler, self.optimizer, num_warmup_steps=h.warmup_steps,
                                         num_training_steps=total_steps)  # fmt: skip
        self.loader, self.epoch = batches, 0
        self.batches = iter(batches)

    def next_batch(self) -> dict:
        """The next batch; a new epoch (with its own shuffle, when the sampler has ``set_epoch``) when one ends."""
        try:
            return next(self.batches)
        except StopIteration:
            self.epoch += 1
            sampler = getattr(self.loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            return next(self.batches)

    def loss(self, batch: dict) -> torch.Tensor:
        pixels, prompts = batch["pixel_values"].to(self.device), list(batch["prompts"])
        n = len(pixels)
        if "class_pixel_values" in batch:
            pixels = torch.cat([pixels, batch["class_pixel_values"].to(self.device)])
            prompts += list(batch["class_prompts"])
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample()
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            # Contiguous as in DiffusionBase.encode_images: randn_like follows the strides of the VAE's
            # channels-last output, so the same seed would otherwise draw other noise.
            latents = ((latents - shift) * self.vae.config.scaling_factor).contiguous()
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)  # fmt: skip
            context = self.text_encoder(ids)[0]
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        noise = torch.randn_like(latents)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if len(per_sample) == n:
            return per_sample.mean()
        return per_sample[:n].mean() + self.prior_loss_weight * per_sample[n:].mean()

    def step(self) -> torch.Tensor:
        loss = self.loss(self.next_batch())
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
