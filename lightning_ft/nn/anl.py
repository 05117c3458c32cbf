"""ANL ("Attention-NonLinear") modules and image-condition encoders for condition-based tuning.

docs/methods.md (ANL): semantic embeddings of condition images are injected into a frozen pretrained denoiser
through ANL modules inserted after its residual blocks; only they train. What was read: cross-attention fusion plus
a non-linear mapping, inserted hierarchically. **Inferred** (the paper's full text was not available): one module
after every ``ResnetBlock2D``, each

    h <- h + Proj_a(CrossAttn(Q = GN(h) tokens, K = V = E))       E: condition tokens (B, L, D)
    h <- h + Proj_m(MLP(LN(h))),  MLP C -> 4C -> C, GELU

with ``Proj_a`` and the MLP's last layer zero-initialised (the denoiser is unchanged at step 0) and C/64 heads.

The condition tokens reach the modules through a shared ``ConditionContext`` that the method fills before each
denoiser call: diffusers' resnets take (hidden states, time embedding) only. The wrapping (``ResnetWithANL``) forks no
diffusers class. Written here because no maintained library provides these modules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

ANL_FOLDER = "anl_modules"


class ConditionContext:
    """The condition tokens (B, L, D) of the denoiser call in progress; set by the method, read by the modules."""

    def __init__(self):
        self.tokens: torch.Tensor | None = None


class ANLModule(nn.Module):
    """Cross-attention to the condition tokens, then a non-linear mapping; both residual, both zero at init."""

    def __init__(self, channels: int, condition_dim: int, head_width: int = 64):
        super().__init__()
        heads = max(1, channels // head_width)
        while channels % heads:
            heads -= 1
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels)
        self.attention = nn.MultiheadAttention(
            channels, heads, kdim=condition_dim, vdim=condition_dim, batch_first=True
        )
        self.mlp_norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))
        for layer in (self.attention.out_proj, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, c, height, width = h.shape
        query = self.norm(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = tokens.to(h.dtype)
        x = h.flatten(2).transpose(1, 2) + self.attention(query, tokens, tokens, need_weights=False)[0]
        x = x + self.mlp(self.mlp_norm(x))
        return x.transpose(1, 2).reshape(b, c, height, width)


class ResnetWithANL(nn.Module):
    """A diffusers resnet block followed by an ANL module reading the context's condition tokens."""

    def __init__(self, resnet: ResnetBlock2D, anl: ANLModule, context: ConditionContext):
        super().__init__()
        self.resnet, self.anl, self.context = resnet, anl, context

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.resnet(*args, **kwargs)
        tokens = self.context.tokens
        if tokens is None:
            raise RuntimeError("ANL module: no condition tokens set for this denoiser call (ConditionContext)")
        return self.anl(out, tokens)


def insert_anl(denoiser: nn.Module, condition_dim: int, head_width: int = 64) -> tuple[dict, ConditionContext]:
    """Wrap every ``ResnetBlock2D`` of ``denoiser`` with a zero-initialised ANL module; returns them by resnet name
    and the context that feeds them."""
    context = ConditionContext()
    modules = {}
    for parent_name, parent in list(denoiser.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, ResnetBlock2D):
                channels = child.out_channels
                anl = ANLModule(channels, condition_dim, head_width)
                anl.to(next(child.parameters()).device)
                setattr(parent, child_name, ResnetWithANL(child, anl, context))
                modules[f"{parent_name}.{child_name}" if parent_name else child_name] = anl
    if not modules:
        raise ValueError("ANL: the denoiser has no diffusers ResnetBlock2D to insert modules after (a UNet is needed)")
    return modules, context


def anl_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name, module in denoiser.named_modules()
        if isinstance(module, ResnetWithANL)
        for key, value in module.anl.state_dict().items()
    }


def without_anl(denoiser: nn.Module) -> nn.Module:
    """Unwrap every ``ResnetWithANL`` in place (the plain diffusers module); returns ``denoiser``."""
    for parent in list(denoiser.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, ResnetWithANL):
                setattr(parent, child_name, child.resnet)
    return denoiser


def save_anl(
    denoiser: nn.Module, null_tokens: torch.Tensor, references: torch.Tensor, folder: Path, config: dict
) -> Path:
    """Write the ANL modules, the learned null tokens and the reference condition images beside an exported
    pipeline (``<folder>/anl_modules/``)."""
    from safetensors.torch import save_file

    target = Path(folder) / ANL_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    state = {**anl_state_dict(denoiser), "null_tokens": null_tokens.detach().clone()}
    if len(references):
        state["reference_conditions"] = references.detach().cpu().clone()
    save_file({k: v.contiguous() for k, v in state.items()}, target / "anl.safetensors")
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def load_anl_weights(denoiser: nn.Module, folder: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load saved ANL weights into a denoiser that already has its modules inserted; returns the null tokens and
    the reference condition images (None when none were saved)."""
    from safetensors.torch import load_file

    weights = load_file(Path(folder) / ANL_FOLDER / "anl.safetensors")
    for name, module in denoiser.named_modules():
        if isinstance(module, ResnetWithANL):
            prefix = f"{name}."
            module.anl.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    return weights["null_tokens"], weights.get("reference_conditions")


# ------------------------------------------------------------------------------------ image-condition encoders
class CLIPVisionTokens(nn.Module):
    """Condition tokens from a local CLIP vision checkpoint: the last hidden states (ViT-L/14: 257 x 1024)."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import CLIPVisionModel

        from lightning_ft.metrics.backbones import CLIPPreprocess, clip_normalisation, load_pretrained

        self.model = load_pretrained(CLIPVisionModel, path, "clip (condition encoder)")
        self.dim = self.model.config.hidden_size
        self.preprocess = CLIPPreprocess(self.model.config.image_size, *clip_normalisation(path))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> the last hidden states (B, L, D)."""
        return self.model(pixel_values=self.preprocess((images + 1) / 2)).last_hidden_state


def make_condition_encoder(name: str = "auto", path: str | None = None, declared: dict | None = None) -> nn.Module:
    """ANL's frozen image-condition encoder, with a ``dim`` attribute (token width).

    Args:
        name: ``auto`` (default: what the model declares for the ``condition`` role, ``declared``, else
            ``clip``), ``clip`` (CLIP vision tokens, the paper's ViT-L/14 by default) or ``package.module:function``
            (a factory taking ``path``).
        path: the encoder's folder or hub id (default: the declared one, or CLIP ViT-L/14's hub id).
        declared: the model's declared backbones by role (``lightning_ft.metrics.backbones.model_backbones``).
    """
    from lightning_ft.metrics.backbones import DEFAULT_CHECKPOINTS, backbone_spec, import_factory

    name, path = backbone_spec("condition", name, path, declared)
    if name == "clip":
        encoder = CLIPVisionTokens(path or DEFAULT_CHECKPOINTS["clip"])
    elif ":" in name:
        encoder = import_factory(name)(path)
    else:
        raise ValueError(f"model.condition_encoder={name!r} is not 'auto', 'clip' or 'package.module:function'")
    if not hasattr(encoder, "dim"):
        raise TypeError(f"condition encoder {name!r} has no 'dim' attribute (its token width)")
    return encoder.eval().requires_grad_(False)
