"""Which modules of a diffusers denoiser are attention, read by the core (trainable sets, LoRA targets) and by the
building blocks in ``nn`` (adapters) alike: it sits below both, so neither imports the other."""

from __future__ import annotations

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention


def is_attention(module: torch.nn.Module) -> bool:
    """A diffusers attention module: ``Attention`` (UNets, DiT, PixArt, SD3's joint attention) or one of the newer
    per-model classes built on ``AttentionModuleMixin`` (``FluxAttention``, ...)."""
    return isinstance(module, (Attention, AttentionModuleMixin))


def attention_parameter_names(denoiser: torch.nn.Module) -> set[str]:
    """Names of every parameter inside a diffusers attention module (q/k/v/out projections, the joint attention's
    text-stream projections, and their norms)."""
    names = set()
    for module_name, module in denoiser.named_modules():
        if is_attention(module):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + n for n, _ in module.named_parameters())
    return names
