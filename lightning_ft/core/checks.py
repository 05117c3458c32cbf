"""Checks of ``DiffusionBase``'s settings, run first in its constructor: each error names the config key and value.

They run before any component is loaded, so a typo fails in a second, before class images are sampled or anything
is written, instead of at the first training step (``prediction_type``), at the first sample (``sample_steps``) or
once the optimizer is built (``lr_scheduler``).
"""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler as get_lr_scheduler

from lightning_ft.core.quantize import check_quantize_setting

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _fail(key: str, value, rule: str) -> None:
    raise ValueError(f"model.{key}={value!r}: {rule}")


def check_lr_scheduler(name: str, warmup_steps: int) -> None:
    """Build the schedule once on a dummy optimizer: a typo, or a schedule that needs settings this module does not
    pass (e.g. ``piecewise_constant``), fails here naming ``model.lr_scheduler``."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        get_lr_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=10)
    except ValueError as error:
        from diffusers.optimization import SchedulerType

        known = [s.value for s in SchedulerType]
        _fail("lr_scheduler", name, f"not a schedule this module can build ({error}); diffusers knows {known}")


def check_lora_variant(h, method: str) -> None:
    """``model.lora_variant`` must name a PEFT method this code trains, and only with ``trainable='lora'``, which
    ``method`` (the class's name, for the message) trains; OFT has no scale and PEFT never applies its OFT dropout,
    so ``lora_alpha`` / ``lora_dropout`` there are refused rather than silently ignored."""
    from lightning_ft.core.trainable import LORA_VARIANTS

    variant = h.lora_variant
    if variant not in LORA_VARIANTS:
        _fail("lora_variant", variant, f"must be one of {LORA_VARIANTS}")
    if variant != "lora" and h.trainable != "lora":
        _fail("lora_variant", variant, f"{method} with model.trainable={h.trainable!r} trains no LoRA; a LoRA variant "
                                       "needs model.trainable='lora'")  # fmt: skip
    if variant == "oft" and h.lora_alpha is not None:
        _fail("lora_alpha", h.lora_alpha, "model.lora_variant='oft' rotates the weights and has no scale: leave it "
                                          "null")  # fmt: skip
    if variant == "oft" and h.lora_dropout:
        _fail("lora_dropout", h.lora_dropout, "PEFT's OFT layer never applies its dropout: with "
                                              "model.lora_variant='oft' it must be 0")  # fmt: skip


def check_model_settings(h, method: str = "DiffusionBase") -> None:
    """Reject settings that cannot mean anything: ``h`` holds ``DiffusionBase``'s arguments (its hparams); ``method``
    is the class being built (named in the messages of settings that depend on it)."""
    if not h.lr > 0:
        _fail("lr", h.lr, "the learning rate must be > 0")
    check_lora_variant(h, method)
    if h.trainable == "lora" and not h.lora_rank >= 1:
        _fail("lora_rank", h.lora_rank, "model.trainable='lora' needs a LoRA rank >= 1")
    if h.lora_alpha is not None and not h.lora_alpha > 0:
        _fail("lora_alpha", h.lora_alpha, "must be > 0 (or null: the rank)")
    if not 0 <= h.lora_dropout < 1:
        _fail("lora_dropout", h.lora_dropout, "a dropout probability must be in [0, 1)")
    if not h.sample_steps >= 1:
        _fail("sample_steps", h.sample_steps, "sampling needs at least 1 step")
    if h.prediction_type is not None and h.prediction_type not in PREDICTION_TYPES:
        _fail("prediction_type", h.prediction_type, f"must be one of {PREDICTION_TYPES} (or null: the scheduler's)")
    if not 0 <= h.condition_dropout <= 1:
        _fail("condition_dropout", h.condition_dropout, "a probability must be in [0, 1]")
    if h.frozen_dtype not in (None, "bfloat16", "float16"):
        _fail("frozen_dtype", h.frozen_dtype, "must be bfloat16, float16 or null (as loaded)")
    check_quantize_setting(h.quantize, h.trainable, method, h.get("lora_variant", "lora"))
    if h.ema_decay is not None and not 0 <= h.ema_decay < 1:
        _fail("ema_decay", h.ema_decay, "an EMA decay must be in [0, 1) (or null: no EMA)")
    if not h.warmup_steps >= 0:
        _fail("warmup_steps", h.warmup_steps, "must be >= 0")
    if not h.weight_decay >= 0:
        _fail("weight_decay", h.weight_decay, "must be >= 0")
    if not h.adam_eps > 0:
        _fail("adam_eps", h.adam_eps, "must be > 0")
    if len(h.betas) != 2 or not all(0 <= b < 1 for b in h.betas):
        _fail("betas", list(h.betas), "AdamW needs two betas in [0, 1)")
    if h.snr_gamma is not None and not h.snr_gamma > 0:
        _fail("snr_gamma", h.snr_gamma, "must be > 0 (or null: off)")
    if not h.noise_offset >= 0:
        _fail("noise_offset", h.noise_offset, "must be >= 0")
    if not 0 <= h.get("unmasked_weight", 0.0) <= 1:
        _fail("unmasked_weight", h.unmasked_weight, "the loss weight of masked-out pixels must be in [0, 1] (0: they "
                                                    "add nothing, 1: the mask is ignored)")  # fmt: skip
    if not isinstance(h.get("masked_loss_normalize", False), bool):
        _fail("masked_loss_normalize", h.masked_loss_normalize, "must be true or false")
    if not h.guidance_scale >= 0:
        _fail("guidance_scale", h.guidance_scale, "must be >= 0 (1 = no guidance)")
    check_lr_scheduler(h.lr_scheduler, h.warmup_steps)
