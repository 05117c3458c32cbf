"""DreamBooth: fine-tune on a few subject images with a rare token, with optional prior preservation.

L = l(theta; x_inst, t, c_inst) + prior_loss_weight * l(theta; x_cls, t', c_cls), with the class images sampled
from the pretrained model (diffusers ``train_dreambooth.py``; docs/methods.md, DreamBooth). The instance and
class halves go through the denoiser in one batch, as in the reference script. With ``trainable='lora'`` this is
LoRA-DreamBooth (docs/methods.md, LoRA-DreamBooth).

Masked training (batches with loss masks, ``data.mask_dir`` / ``data.alpha_mask``): the instance half is masked, the
prior half is not (its ``class_mask`` is ones, and is taken as ones when the batch has none): the class images are
the model's own samples of the whole class, preserved everywhere.
"""

from __future__ import annotations

import torch

from lightning_ft.core.base import DiffusionBase


def concatenate_halves(instance: dict, prior: dict, pixels: torch.Tensor) -> dict:
    """One batch of the instance half followed by the prior half: lists and tensors held by both are concatenated
    (prompts, labels, image geometry); ``pixels`` are both halves' images, already concatenated."""
    both = {"pixel_values": pixels}
    for key in instance.keys() & prior.keys() - {"pixel_values"}:
        a, b = instance[key], prior[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            both[key] = torch.cat([a, b])
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            both[key] = [*a, *b]
    return both


class DreamBooth(DiffusionBase):
    """DreamBooth (full, attention-only or LoRA fine-tuning, chosen by ``trainable``).

    Args:
        prior_loss_weight: weight of the class-image loss when the batch holds class images (default 1.0).
        **kwargs: see ``DiffusionBase`` (``unmasked_weight`` and ``masked_loss_normalize`` apply to the instance
            images' masks; class images are trained on everywhere).
    """

    def __init__(self, *args, prior_loss_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "class_pixel_values" not in batch:
            return super().training_loss(batch)
        n = len(batch["pixel_values"])
        pixels = torch.cat([batch["pixel_values"], batch["class_pixel_values"]])
        # The prior half's keys are the batch's "class_" keys without the prefix (class_pixel_values, class_prompts,
        # class_original_size, class_crop_top_left, and class_class_labels: the labels of a class-conditional
        # model's class images, else the instance labels).
        instance = {k: v for k, v in batch.items() if not k.startswith("class_") or k == "class_labels"}
        prior = {k[len("class_") :]: v for k, v in batch.items() if k.startswith("class_") and k != "class_labels"}
        if "class_labels" not in prior and "class_labels" in batch:
            prior["class_labels"] = batch["class_labels"]
        # One encoder pass for both halves (as the reference script does): two smaller passes cost ~1 ms more a step.
        conditions = self.encode_conditions(concatenate_halves(instance, prior, pixels))
        keys = self.image_keys(batch, "pixel_values", "class_pixel_values")
        # Loss masks: the instance images' own, ones for the class images (unmasked); none without instance masks.
        mask = self.loss_mask(batch)
        if mask is not None:
            mask = torch.cat([mask, self.loss_mask(batch, "class_", fill=True)])
        per_sample = self.diffusion_loss(self.encode_images(pixels, keys=keys), conditions, **self.mask_argument(mask))
        instance, prior = per_sample[:n].mean(), per_sample[n:].mean()
        loss = instance + self.hparams.prior_loss_weight * prior
        return loss, {"loss/instance": instance.detach(), "loss/prior": prior.detach()}
