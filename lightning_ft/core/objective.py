"""The training objective of ``DiffusionBase``: timesteps, noise, target, weights and the denoising loss.

Everything about the forward process comes from ``self.noise_process`` (``lightning_ft.core.noise_process``); a
method changes the objective by overriding ``sample_timesteps``, ``timestep_weights`` or ``training_loss``.

Masked training (kohya's sd-scripts and OneTrainer): a batch may carry a loss mask per image (``mask``, (B, 1, H, W)
in [0, 1] at the images' size, ``lightning_ft.data.masks``); ``loss_mask`` reads it and ``diffusion_loss`` weights
the squared error with it at the error's resolution. Every method passes it: prior-preservation class images
(``class_mask``, ones when absent) and images a method makes itself (Diff-Tuning's memory bank) are trained
everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ObjectiveMixin:
    """Needs ``noise_process``, ``hparams``, ``device``, ``encode_images``, ``encode_conditions`` and ``predict``."""

    def sample_timesteps(self, n: int) -> torch.Tensor:
        """Training timesteps for ``n`` samples (default: the noise process's, uniform for DDPM)."""
        return self.noise_process.sample_timesteps(n, device=self.device)

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights: the noise process's own (1 for DDPM; ``loss_weighting`` for flow matching), times
        min-SNR-gamma when ``snr_gamma`` is set (DDPM)."""
        weights = self.noise_process.loss_weights(timesteps)
        gamma = self.hparams.snr_gamma
        if gamma is None:
            return weights
        return weights * self.noise_process.min_snr_weights(timesteps, gamma)

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.noise_process.target(x0, noise, timesteps)

    def make_noise(self, x0: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x0)
        if self.hparams.noise_offset:
            noise = noise + self.hparams.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, device=x0.device)
        return noise

    def loss_mask(self, batch: dict, prefix: str = "", fill: bool = False) -> torch.Tensor | None:
        """The loss mask of the images ``{prefix}pixel_values`` of ``batch``: its ``{prefix}mask`` (float32 (B, 1, H,
        W) in [0, 1], 1 = train on this pixel), or None when it has none (no masks configured), or ones with
        ``fill`` (images trained on everywhere, e.g. prior-preservation class images whose ``class_mask`` is
        absent). A mask that does not fit its images is an error naming both shapes."""
        pixels = batch[f"{prefix}pixel_values"]
        mask = batch.get(f"{prefix}mask")
        if mask is None:
            return pixels.new_ones(len(pixels), 1, *pixels.shape[-2:], dtype=torch.float32) if fill else None
        if mask.ndim != 4 or mask.shape[:2] != (len(pixels), 1) or mask.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(
                f"batch['{prefix}mask'] has shape {tuple(mask.shape)}, but the loss mask of {prefix}pixel_values "
                f"{tuple(pixels.shape)} must be (batch, 1, height, width) = {(len(pixels), 1, *pixels.shape[-2:])}"
            )
        return mask.to(device=pixels.device, dtype=torch.float32)

    @staticmethod
    def mask_argument(mask: torch.Tensor | None) -> dict:
        """``{"mask": mask}``, or nothing without a mask: ``diffusion_loss(..., **self.mask_argument(mask))`` calls
        it exactly as before masks existed when the batch has none."""
        return {} if mask is None else {"mask": mask}

    def loss_weight_map(self, mask: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """The per-element weights of an ``error`` (B, C, [T,] h, w) from a pixel ``mask`` (B, 1, H, W): the mask
        area-averaged to (h, w) as kohya's ``apply_masked_loss`` resizes it (a latent cell weighs the fraction of
        its pixels that are masked in), then ``unmasked_weight + (1 - unmasked_weight) * mask`` (OneTrainer's
        weight of the masked-out pixels; 0 = they add nothing). Shape (B, 1, [1,] h, w): it broadcasts over the
        channels (and a video's frames)."""
        weights = F.interpolate(mask.to(error.device, torch.float32), size=tuple(error.shape[-2:]), mode="area")
        floor = self.hparams.unmasked_weight
        if floor:
            weights = floor + (1.0 - floor) * weights
        # A video's error (B, C, T, h, w): the one mask of each sample holds for every frame.
        return weights.reshape(weights.shape[0], 1, *([1] * (error.ndim - 4)), *weights.shape[-2:])

    def per_sample_error(
        self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-sample squared error (shape [B]): the mean over every non-batch dimension, in float32. With a pixel
        ``mask``, each element is weighted by ``loss_weight_map`` first and the mean is still over every element,
        not over the mask's area (kohya's semantics: an image half masked out adds about half the loss), unless
        ``masked_loss_normalize`` divides each sample by its mean weight (OneTrainer's
        ``normalize_masked_area_loss``: a small mask then weighs like a full image)."""
        error = F.mse_loss(prediction.float(), target.float(), reduction="none")
        dims = tuple(range(1, error.ndim))
        if mask is None:
            return error.mean(dim=dims)
        weights = self.loss_weight_map(mask, error)
        loss = (error * weights).mean(dim=dims)
        if self.hparams.masked_loss_normalize:
            # An all-zero mask has no area to normalise by: its sample stays at 0 (its error times 0).
            loss = loss / weights.mean(dim=dims).clamp_min(torch.finfo(torch.float32).tiny)
        return loss

    def diffusion_loss(
        self,
        x0: torch.Tensor,
        condition,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        weighted: bool = True,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample denoising loss (shape [B]): MSE to the prediction target, mean over dimensions, times
        ``timestep_weights`` when ``weighted``. ``mask``: per-image pixel loss masks (B, 1, H, W) in [0, 1]
        (``loss_mask``), laid over the error at its resolution (``per_sample_error``); None: unmasked."""
        timesteps = self.sample_timesteps(x0.shape[0]) if timesteps is None else timesteps
        noise = self.make_noise(x0) if noise is None else noise
        noisy = self.noise_process.add_noise(x0, noise, timesteps)
        pred = self.predict(noisy, timesteps, condition)
        target = self.prediction_target(x0, noise, timesteps)
        loss = self.per_sample_error(pred, target, mask)
        return loss * self.timestep_weights(timesteps) if weighted else loss

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective of one batch; returns the loss and a dict of values to log. Default: denoising loss (masked
        by the batch's loss masks, if any)."""
        x0 = self.encode_images(batch["pixel_values"], keys=self.image_keys(batch))
        mask = self.mask_argument(self.loss_mask(batch))
        loss = self.diffusion_loss(x0, self.encode_conditions(batch), **mask).mean()
        return loss, {"loss/diffusion": loss.detach()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logs = self.training_loss(batch)
        if not torch.isfinite(loss):
            # Stop before the update: the weights stay those of the last good step, and the checkpoints already
            # written (last.ckpt included) are left as they are. Every rank sees the same loss under DDP.
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in logs.items())
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at global step {self.global_step} (batch {batch_idx}; "
                f"{parts}): training stopped before this update; the last checkpoint written is the last good one. "
                "Lower model.lr, check the data, or use precision 32 / bf16-mixed instead of 16-mixed."
            )
        # The latest loss and its parts, on every step, for callbacks, subclasses and the CLI's progress bar
        # (detached: no graph is kept).
        self.last_loss_parts = {"loss": loss.detach(), **logs}
        if self.logs_are_written() or self.is_last_training_step():
            # Logged only on the steps whose logs reach the logger (``trainer.log_every_n_steps``) and on the last
            # one (so that ``callback_metrics`` end with the final values, e.g. for a sweep's ranking): each
            # ``self.log`` costs Lightning ~0.3-0.5 ms of bookkeeping a step, most of the framework's own per-step
            # cost (docs/performance.md). Between them ``callback_metrics`` hold the last logged values.
            batch_size = len(batch["pixel_values"])
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)
        return loss

    def logs_are_written(self) -> bool:
        """Whether values logged now reach the logger: always outside a trainer, else Lightning's own rule (every
        ``trainer.log_every_n_steps`` steps). For diagnostics that cost something to compute or to log."""
        # Lightning exposes the rule only on the trainer's logger connector (private); without one: True.
        connector = getattr(self._trainer, "_logger_connector", None)
        return connector is None or bool(connector.should_update_logs)

    def is_last_training_step(self) -> bool:
        """Whether the step running now is the fit's last (its ``max_steps``, or the last batch of its last epoch)."""
        trainer = self._trainer
        if trainer is None:
            return True
        if 0 < trainer.max_steps <= trainer.global_step + 1:
            return True
        epochs = trainer.max_epochs
        return bool(trainer.is_last_batch) and epochs is not None and 0 < epochs <= trainer.current_epoch + 1

    @torch.no_grad()
    def evaluation_loss(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Denoising loss at fixed timesteps and noise (seeded by the batch index): comparable across checkpoints,
        unlike the training loss whose timesteps are random. Timesteps are stratified over the process with an
        offset seeded by the batch index, so that batches of one image do not all score t=0. The VAE latent is drawn
        from the same generator: the global RNG (and with it the training run) is left untouched."""
        generator = torch.Generator().manual_seed(batch_idx)
        x0 = self.encode_images(batch["pixel_values"], generator=generator, keys=self.image_keys(batch))
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        offset = torch.rand(1, generator=generator)
        timesteps = self.noise_process.stratified_timesteps(len(x0), offset, device=x0.device)
        mask = self.mask_argument(self.loss_mask(batch))
        return self.diffusion_loss(x0, self.encode_conditions(batch), timesteps, noise, weighted=False, **mask).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.evaluation_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["pixel_values"]))
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.evaluation_loss(batch, batch_idx)
        self.log("test/loss", loss, batch_size=len(batch["pixel_values"]))
        return loss
