"""Pretraining a small diffusers ``AutoencoderKL`` for the embedded world.

Stable Diffusion works on VAE latents; the embedded text-to-image model does the same so that it is a plain
``StableDiffusionPipeline`` (diffusers' pipeline has no pixel-space text-to-image variant that loads without
extra arguments) and so that fine-tuning runs the very code path a Stable Diffusion user runs.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL


class AutoencoderPretraining(L.LightningModule):
    """Train an ``AutoencoderKL`` with an L1 + MSE reconstruction loss and a small KL term.

    Args:
        config: ``AutoencoderKL`` constructor arguments (block_out_channels, latent_channels, ...), for a new one.
        pretrained: an ``AutoencoderKL`` folder to continue from instead (default None).
        lr: AdamW learning rate (default 1e-3).
        kl_weight: weight of the KL term towards N(0, I) (default 1e-6, as in latent-diffusion autoencoders).
        anchor_weight: with ``pretrained``, weight of an MSE that keeps the latent means of the batch's plain
            renders (``styled`` False) at those of the pretrained encoder (default 0: off). A diffusion model
            trained on the old latents of the source domain then keeps working, while the styled renders (stripes,
            outlines) are free to take latents that hold their detail.
        max_steps_for_schedule: cosine-decay the learning rate to 0 over this many steps (default None: constant).
        export_dir: where ``on_fit_end`` saves the autoencoder with ``save_pretrained`` (default: none).
    """

    def __init__(
        self,
        config: dict | None = None,
        pretrained: str | None = None,
        lr: float = 1e-3,
        kl_weight: float = 1e-6,
        anchor_weight: float = 0.0,
        max_steps_for_schedule: int | None = None,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if (config is None) == (pretrained is None):
            raise ValueError("AutoencoderPretraining: give exactly one of model.config and model.pretrained")
        if anchor_weight and pretrained is None:
            raise ValueError("AutoencoderPretraining: model.anchor_weight needs model.pretrained (the latents to keep)")
        self.vae = AutoencoderKL.from_pretrained(pretrained) if pretrained else AutoencoderKL(**config)
        # The frozen encoder whose latents the anchor keeps (a plain attribute: not trained, not checkpointed).
        self._anchor = [AutoencoderKL.from_pretrained(pretrained).eval().requires_grad_(False)] if anchor_weight else []

    def training_step(self, batch, batch_idx):
        x = batch["pixel_values"]
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        l1, mse = F.l1_loss(recon, x), F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + mse + self.hparams.kl_weight * kl
        logs = {"train/l1": l1, "train/mse": mse, "train/kl": kl}
        plain = ~batch["styled"] if self._anchor else None
        if plain is not None and plain.any():
            anchor = self._anchor[0].to(x.device)
            with torch.no_grad():
                target = anchor.encode(x[plain]).latent_dist.mean
            logs["train/anchor"] = F.mse_loss(posterior.mean[plain], target)
            loss = loss + self.hparams.anchor_weight * logs["train/anchor"]
        self.log_dict({"train/loss": loss, **logs}, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x = batch["pixel_values"]
        recon = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample
        # PSNR on [0, 1] images: the figure the model card reports.
        mse = F.mse_loss((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2)
        self.log("val/psnr", -10 * torch.log10(mse), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        if not self.hparams.max_steps_for_schedule:
            return optimizer
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.hparams.max_steps_for_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_end(self):
        if self.hparams.export_dir and self.trainer.is_global_zero:
            batches = [b["pixel_values"] for b, _ in zip(self.trainer.datamodule.val_dataloader(), range(8))]
            if not self.hparams.pretrained:  # a continued autoencoder keeps the scale its diffusion model knows
                calibrate_scaling_factor(self.vae, torch.cat(batches).to(self.device))
            Path(self.hparams.export_dir).mkdir(parents=True, exist_ok=True)
            self.vae.save_pretrained(self.hparams.export_dir)


@torch.no_grad()
def calibrate_scaling_factor(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """Set ``vae.config.scaling_factor`` to 1 / std of the latents of ``pixels`` (how SD's 0.18215 was chosen),
    so that the diffusion model sees unit-variance inputs; returns the factor."""
    was_training = vae.training
    vae.eval()
    latents = vae.encode(pixels).latent_dist.sample()
    vae.train(was_training)
    factor = float(1.0 / latents.float().std())
    vae.register_to_config(scaling_factor=factor)
    return factor
