"""Speed and memory options of the denoiser: attention kernel, channels-last layout, gradient checkpointing, compile.

Each one is a switch of torch or diffusers applied to the built model; nothing here changes the math (up to
floating-point reordering), which ``tests/core/test_speed_options.py`` checks against the plain model.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

#: ``attention`` values: diffusers' processor classes for the UNet family's ``Attention`` modules.
ATTENTION_PROCESSORS = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}


def set_attention(denoiser: torch.nn.Module, attention: str | None) -> None:
    """``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (diffusers' default on torch 2); ``eager``:
    the explicit softmax(QK^T)V of diffusers' ``AttnProcessor``; None: leave the model's own processors."""
    if attention is None:
        return
    if attention not in ATTENTION_PROCESSORS:
        raise ValueError(f"model.attention={attention!r}: choose one of {sorted(ATTENTION_PROCESSORS)} or null")
    if not hasattr(denoiser, "set_attn_processor"):
        raise ValueError(f"model.attention={attention!r}: {type(denoiser).__name__} has no set_attn_processor")
    denoiser.set_attn_processor(ATTENTION_PROCESSORS[attention]())


def enable_gradient_checkpointing(denoiser: torch.nn.Module, text_encoder) -> None:
    """Recompute block activations in the backward pass instead of storing them (memory for time). The text
    encoder(s) (one module or a list) are included when given (i.e. when they train)."""
    if not getattr(denoiser, "_supports_gradient_checkpointing", False):
        raise ValueError(f"model.gradient_checkpointing: {type(denoiser).__name__} does not support it")
    denoiser.enable_gradient_checkpointing()
    encoders = text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    for encoder in encoders:
        if encoder is not None and getattr(encoder, "supports_gradient_checkpointing", False):
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_speed_options(
    denoiser: torch.nn.Module,
    text_encoder=None,
    *,
    attention: str | None = None,
    channels_last: bool = False,
    gradient_checkpointing: bool = False,
    compile: bool = False,
) -> None:
    """Apply the options in place. ``compile`` uses ``nn.Module.compile`` so parameter names, the state dict and
    export stay those of the plain module; it compiles lazily, on the first forward."""
    set_attention(denoiser, attention)
    if channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if gradient_checkpointing:
        enable_gradient_checkpointing(denoiser, text_encoder)
    if compile:
        denoiser.compile()
