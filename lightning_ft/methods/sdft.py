"""SDFT: self-distillation fine-tuning from the frozen source model (docs/methods.md, SDFT).

The paper (WACV 2024) distils from the source model, pretrained on large data, its general features (shape,
colour) and less its domain-specific ones (texture, detail), "without disturbing training on the target dataset".
Only its abstract was read and no code was found: **the whole mechanism below is inferred**, a placeholder
consistent with that description, not a reproduction.

Inferred spec: teacher eps_phi = the frozen pretrained denoiser, student eps_theta = the trained copy, both fed the
SAME noisy input, timestep and condition;

    L = mean_b l(theta; x0, t, c) + distill_weight * mean_b w(t) * D(student, teacher)

- ``distill_target='prediction'``: D = ||eps_theta(x_t, t) - sg[eps_phi(x_t, t)]||^2 on the raw model output
  (whatever the prediction type), w(t) = 1[t >= distill_from * T]: coarse structure and colour are decided at high
  noise, details at low noise, so only the high-noise half is pulled towards the teacher;
- ``distill_target='lowpass_x0'`` (the optional stronger variant): D = ||pool(x0_theta) - pool(x0_phi)||^2 with
  pool = ``lowpass_factor``x average pooling of each model's predicted x0, at every t. An epsilon model's x0 error
  is its epsilon error times sqrt((1 - abar) / abar), which explodes near t = T (10^8 for a cosine schedule), so
  the term is weighted by min(SNR(t), ``lowpass_snr_gamma``) (min-SNR in x0 space: at high noise it equals the
  pooled epsilon difference); ``lowpass_snr_gamma=None`` leaves it unweighted.

Masked training (batches with loss masks, ``data.mask_dir`` / ``data.alpha_mask``): the diffusion term is masked, the
distillation term is not. Distillation keeps the source model's general behaviour everywhere in the image: a
masked-out region (a background not to be learned) is exactly where the student should stay the teacher, so
masking it would remove the term where it matters most.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_ft.core.base import DiffusionBase

DISTILL_TARGETS = ("prediction", "lowpass_x0")


class SelfDistillationFineTuning(DiffusionBase):
    """Fine-tuning with a distillation term towards the frozen pretrained model (inferred SDFT).

    Args:
        distill_weight: lambda_KD, weight of the distillation term (default 1.0, inferred).
        distill_from: tau; with ``distill_target='prediction'`` only timesteps t >= tau * T are distilled
            (default 0.5, inferred).
        distill_target: ``prediction`` (raw outputs, t >= tau T) or ``lowpass_x0`` (average-pooled predicted x0
            at every t) (default ``prediction``, inferred).
        lowpass_factor: pooling factor of ``lowpass_x0`` (default 4, inferred).
        lowpass_snr_gamma: ``lowpass_x0`` weight min(SNR(t), gamma), None = unweighted (default 1.0, inferred).
        **kwargs: see ``DiffusionBase``. Loss masks (``unmasked_weight``, ``masked_loss_normalize``) weight the
            diffusion term only: the distillation term keeps the source model's behaviour everywhere, unmasked.
    """

    requires_frozen_denoiser = True
    trains_controlnets = False  # distils the denoiser itself from its source model

    def __init__(
        self,
        *args,
        distill_weight: float = 1.0,
        distill_from: float = 0.5,
        distill_target: str = "prediction",
        lowpass_factor: int = 4,
        lowpass_snr_gamma: float | None = 1.0,
        **kwargs,
    ):
        if distill_target not in DISTILL_TARGETS:
            raise ValueError(f"model.distill_target={distill_target!r} is not one of {DISTILL_TARGETS}")
        if not 0.0 <= distill_from <= 1.0:
            raise ValueError(f"model.distill_from={distill_from} must be in [0, 1]")
        if lowpass_factor < 1:
            raise ValueError(f"model.lowpass_factor={lowpass_factor} must be >= 1")
        super().__init__(*args, **kwargs)

    def predicted_x0(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The x0 a model output implies (the noise process's rule for its prediction type)."""
        return self.noise_process.predicted_x0(prediction, noisy, timesteps)

    def distill_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """w(t) of the distillation term: 1[t >= tau T] (prediction), or min(SNR, gamma) / 1 (lowpass_x0). "t >= tau
        T" is read as the noise process's fraction of the way from data to noise (t / T for DDPM)."""
        h = self.hparams
        if h.distill_target == "prediction":
            return (self.noise_process.fraction(timesteps) >= h.distill_from).float()
        if h.lowpass_snr_gamma is None:
            return torch.ones(len(timesteps), device=timesteps.device)
        return self.noise_process.snr(timesteps).clamp(max=h.lowpass_snr_gamma).float()

    def distillation_loss(
        self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, condition
    ) -> torch.Tensor:
        """Per-sample w(t) * D(student, teacher) for the student's ``prediction`` on ``noisy`` at ``timesteps``.

        The teacher runs under ``torch.inference_mode`` (stop-gradient: the gradient reaches the student only), and
        only on the samples whose weight is not zero: with ``distill_target='prediction'`` that is the t >= tau T
        part of the batch (half of it at the default tau = 0.5), which halves the teacher's cost. The rows left out
        contribute exactly 0, as they would with the teacher run on them."""
        weights = self.distill_weights(timesteps)
        distance = torch.zeros_like(weights)
        rows = weights.nonzero().flatten()
        if len(rows) == 0:
            return distance
        every = len(rows) == len(weights)
        if not every:
            prediction, noisy, timesteps, condition = prediction[rows], noisy[rows], timesteps[rows], condition[rows]
        with torch.inference_mode():
            teacher = self.predict(noisy, timesteps, condition, denoiser=self.frozen_denoiser)
        teacher = teacher.clone()  # an inference tensor cannot be saved for the student's backward; a copy can
        student = prediction.float()
        teacher = teacher.float()
        if self.hparams.distill_target == "lowpass_x0":
            factor = self.hparams.lowpass_factor
            student = F.avg_pool2d(self.predicted_x0(student, noisy.float(), timesteps), factor, ceil_mode=True)
            teacher = F.avg_pool2d(self.predicted_x0(teacher, noisy.float(), timesteps), factor, ceil_mode=True)
        per_row = F.mse_loss(student, teacher, reduction="none").mean(dim=tuple(range(1, student.ndim)))
        if every:
            return per_row * weights
        return distance.index_put((rows,), per_row * weights[rows])

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The diffusion loss is computed here (not with diffusion_loss) so that the student's single forward
        # serves both terms, on the same noisy inputs and timesteps as the teacher's.
        # Contiguous: the VAE returns channels-last latents, and diffusers' resnet blocks make their shortcut input
        # contiguous in train mode only, so the student (train) and teacher (eval) would take different conv
        # kernels and differ by ~1e-6 even with identical weights.
        x0 = self.encode_images(batch["pixel_values"], keys=self.image_keys(batch)).contiguous()
        condition = self.encode_conditions(batch)
        timesteps = self.sample_timesteps(x0.shape[0])
        noise = self.make_noise(x0)
        noisy = self.noise_process.add_noise(x0, noise, timesteps)
        prediction = self.predict(noisy, timesteps, condition)
        target = self.prediction_target(x0, noise, timesteps)
        # The diffusion term is masked by the batch's loss masks (if any) ...
        per_sample = self.per_sample_error(prediction, target, self.loss_mask(batch))
        per_sample = per_sample * self.timestep_weights(timesteps)
        diffusion = per_sample.mean()
        # ... the distillation term never is: it keeps the source model's general behaviour everywhere in the image,
        # masked-out regions included (there, with model.unmasked_weight 0, it is the only term that trains).
        distill = self.distillation_loss(prediction, noisy, timesteps, condition).mean()
        loss = diffusion + self.hparams.distill_weight * distill
        return loss, {"loss/diffusion": diffusion.detach(), "loss/distill": distill.detach()}
