"""DreamBooth: fine-tune on a few subject images with a rare token, with optional prior preservation.

L = l(theta; x_inst, t, c_inst) + prior_loss_weight * l(theta; x_cls, t', c_cls), with the class images sampled
from the pretrained model (diffusers ``train_dreambooth.py``; docs/methods.md, DreamBooth). The instance and
class halves go through the denoiser in one batch, as in the reference script. With ``trainable='lora'`` this is
LoRA-DreamBooth (docs/methods.md, LoRA-DreamBooth).
"""

from __future__ import annotations

import torch

from lightning_ft.core.base import DiffusionBase


class DreamBooth(DiffusionBase):
    """DreamBooth (full, attention-only or LoRA fine-tuning, chosen by ``trainable``).

    Args:
        prior_loss_weight: weight of the class-image loss when the batch holds class images (default 1.0).
        **kwargs: see ``DiffusionBase``.
    """

    def __init__(self, *args, prior_loss_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "class_pixel_values" not in batch:
            return super().training_loss(batch)
        n = len(batch["pixel_values"])
        pixels = torch.cat([batch["pixel_values"], batch["class_pixel_values"]])
        joined = {
            "pixel_values": pixels,
            "prompts": list(batch["prompts"]) + list(batch["class_prompts"]),
        }
        if "class_labels" in batch:
            joined["class_labels"] = torch.cat([batch["class_labels"], batch["class_labels"]])
        per_sample = self.diffusion_loss(self.encode_images(pixels), self.encode_conditions(joined))
        instance, prior = per_sample[:n].mean(), per_sample[n:].mean()
        loss = instance + self.hparams.prior_loss_weight * prior
        return loss, {"loss/instance": instance.detach(), "loss/prior": prior.detach()}
