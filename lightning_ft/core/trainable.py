"""Which parameters of the denoiser train: ``full``, ``attention``, ``lora`` (PEFT) or ``none``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.attention_processor import Attention

TRAINABLE_MODES = ("full", "attention", "lora", "none")
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def attention_parameter_names(denoiser: torch.nn.Module) -> set[str]:
    """Names of every parameter inside a diffusers ``Attention`` module (q/k/v/out projections and their norms)."""
    names = set()
    for module_name, module in denoiser.named_modules():
        if isinstance(module, Attention):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + n for n, _ in module.named_parameters())
    return names


def apply_trainable(
    denoiser: torch.nn.Module,
    mode: str,
    lora_rank: int = 4,
    lora_alpha: float | None = None,
    lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    lora_dropout: float = 0.0,
) -> None:
    """Set ``requires_grad`` on ``denoiser`` for ``mode``; for ``lora`` also insert the PEFT adapter.

    LoRA follows diffusers' DreamBooth-LoRA recipe: ``up`` zero-initialised so the model is unchanged at step 0,
    scale ``alpha / rank`` (``alpha`` defaults to ``rank``: scale 1)."""
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"model.trainable={mode!r} is not one of {TRAINABLE_MODES}")
    if mode == "lora":
        from peft import LoraConfig

        denoiser.requires_grad_(False)
        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
            lora_dropout=lora_dropout,
            init_lora_weights="gaussian",
            target_modules=list(lora_target_modules),
        )
        try:
            denoiser.add_adapter(config)
        except ValueError as error:
            raise ValueError(
                f"model.lora_target_modules={list(lora_target_modules)} matched no layer: {error}"
            ) from None
        return
    if mode == "full":
        denoiser.requires_grad_(True)
        return
    denoiser.requires_grad_(False)
    if mode == "attention":
        names = attention_parameter_names(denoiser)
        if not names:
            raise ValueError("model.trainable='attention' but the denoiser has no diffusers Attention module")
        for name, param in denoiser.named_parameters():
            param.requires_grad_(name in names)


def lora_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``denoiser`` in the layout diffusers' ``save_lora_weights`` expects."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser)


def has_lora(denoiser: torch.nn.Module) -> bool:
    return bool(getattr(denoiser, "_hf_peft_config_loaded", False))
