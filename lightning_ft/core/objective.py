"""The training objective of ``DiffusionBase``: timesteps, noise, target, weights and the denoising loss.

Everything about the forward process comes from ``self.noise_process`` (``lightning_ft.core.noise_process``); a
method changes the objective by overriding ``sample_timesteps``, ``timestep_weights`` or ``training_loss``.
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

    def diffusion_loss(
        self,
        x0: torch.Tensor,
        condition,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        weighted: bool = True,
    ) -> torch.Tensor:
        """Per-sample denoising loss (shape [B]): MSE to the prediction target, mean over dimensions, times
        ``timestep_weights`` when ``weighted``."""
        timesteps = self.sample_timesteps(x0.shape[0]) if timesteps is None else timesteps
        noise = self.make_noise(x0) if noise is None else noise
        noisy = self.noise_process.add_noise(x0, noise, timesteps)
        pred = self.predict(noisy, timesteps, condition)
        target = self.prediction_target(x0, noise, timesteps)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        return loss * self.timestep_weights(timesteps) if weighted else loss

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective of one batch; returns the loss and a dict of values to log. Default: denoising loss."""
        x0 = self.encode_images(batch["pixel_values"], keys=self.image_keys(batch))
        loss = self.diffusion_loss(x0, self.encode_conditions(batch)).mean()
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
        return self.diffusion_loss(x0, self.encode_conditions(batch), timesteps, noise, weighted=False).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.evaluation_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["pixel_values"]))
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.evaluation_loss(batch, batch_idx)
        self.log("test/loss", loss, batch_size=len(batch["pixel_values"]))
        return loss
