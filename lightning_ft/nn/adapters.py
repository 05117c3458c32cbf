"""A3FTA's time-aware adapter, inserted between an attention operation and its output projection.

docs/methods.md (A3FTA) gives the design this implements; the paper's text was not fully available, so the exact layer
shapes are **inferred** (reduction 8, 4 heads, LayerNorm inputs, zero-initialised up-projection and time scale):

    out = W_o (a + Δ) + b_o,   a = softmax(QKᵀ/√d) V   (the attention output, before its output projection)
    e_t = SiLU(time embedding of the denoiser)
    f   = LN(a) + W_tf e_t                      time fusion
    q   = W_dq LN(a),  m = W_dm f               down-projections C -> C/r
    z   = q + MHA(Q=q, K=m, V=m)                cross-attention to the time-aware features
    Δ   = s(t) ⊙ W_up GELU(z),  s(t) = 2 sigmoid(W_ts e_t)

``W_up`` starts at zero, so a denoiser with adapters computes exactly what it computed without them; ``W_ts`` starts
at zero too, so ``s(t) = 1`` at the start. The adapter is inserted by wrapping the output projection ``to_out[0]`` of
diffusers ``Attention`` modules (``AdaptedProjection``), which works with every attention processor and forks no
diffusers class. The time embedding reaches the adapters through a forward hook on the denoiser's
``TimestepEmbedding`` (``TimeEmbeddingTap``): diffusers passes it to the resnets but not to attention. Written here
because no maintained library (PEFT included) offers a time-conditioned adapter at this position.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn

from lightning_ft.attention import is_attention

ADAPTER_FOLDER = "a3fta_adapters"


class TimeEmbeddingTap:
    """Keeps SiLU(time embedding) of the denoiser's current forward, for the adapters to read.

    Hooks the module ``name`` (the model family's ``time_embedding``, e.g. Z-Image's ``t_embedder``), else the first
    ``TimestepEmbedding`` of the denoiser: ``time_embedding`` of a UNet, the first block's timestep embedder of a DiT.
    The embedding's width is the output width of the hooked module's last linear layer. A module that gives a table
    of per-layer modulations (B, M, D) instead of one vector (Chroma's approximator) is read as their mean over M."""

    def __init__(self, denoiser: nn.Module, name: str | None = None):
        if name:
            module = denoiser.get_submodule(name)
        else:
            module = next((m for m in denoiser.modules() if isinstance(m, TimestepEmbedding)), None)
        if module is None:
            raise ValueError(
                "A3FTA needs the denoiser's time embedding: a diffusers TimestepEmbedding, or the module its model "
                "family names (time_embedding)"
            )
        self.dim = [m for m in module.modules() if isinstance(m, nn.Linear)][-1].out_features
        self.value: torch.Tensor | None = None
        module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.value = F.silu(output.mean(dim=1) if output.ndim == 3 else output)


class TimeAwareAdapter(nn.Module):
    """Δ(a, e_t) of the module docstring; zero at initialisation."""

    def __init__(self, channels: int, time_dim: int, reduction: int = 8, heads: int = 4):
        super().__init__()
        hidden = max(heads, channels // reduction)
        hidden += -hidden % heads  # a multiple of the head count
        self.norm = nn.LayerNorm(channels)
        self.time_fusion = nn.Linear(time_dim, channels)
        self.down_q = nn.Linear(channels, hidden)
        self.down_m = nn.Linear(channels, hidden)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.up = nn.Linear(hidden, channels)
        self.time_scale = nn.Linear(time_dim, channels)
        for layer in (self.up, self.time_scale):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, a: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        x = self.norm(a)
        f = x + self.time_fusion(time)[:, None]
        q, m = self.down_q(x), self.down_m(f)
        z = q + self.attention(q, m, m, need_weights=False)[0]
        return 2 * torch.sigmoid(self.time_scale(time))[:, None] * self.up(F.gelu(z))


class AdaptedProjection(nn.Module):
    """``linear(a + adapter(a, e_t))``: an attention output projection with an adapter in front of it."""

    def __init__(self, linear: nn.Linear, adapter: TimeAwareAdapter, tap: TimeEmbeddingTap):
        super().__init__()
        self.linear, self.adapter, self.tap = linear, adapter, tap

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        time = self.tap.value
        if time is None or a.ndim != 3:
            raise RuntimeError("A3FTA adapter: no time embedding for this forward (or attention input is not B,N,C)")
        if time.shape[0] != a.shape[0]:  # a timestep shared by the batch
            time = time.expand(a.shape[0], -1)
        return self.linear(a + self.adapter(a, time.to(a.dtype)))


def output_projection(module: nn.Module) -> nn.Module | None:
    """The own output projection of a diffusers attention: ``to_out[0]``, or ``to_out`` where it is one Linear over
    the attention's ``inner_dim`` (HiDream's attention); None for another module, or an attention without one
    (FLUX.2's single blocks project attention and MLP together through one ``to_out`` Linear: no adapter fits)."""
    out = getattr(module, "to_out", None) if is_attention(module) else None
    if isinstance(out, nn.ModuleList):
        return out[0]
    linear = out.linear if isinstance(out, AdaptedProjection) else out
    return out if isinstance(linear, nn.Linear) and linear.in_features == getattr(module, "inner_dim", None) else None


def set_output_projection(module: nn.Module, projection: nn.Module) -> None:
    """Put ``projection`` where ``output_projection`` found the attention's own."""
    if isinstance(module.to_out, nn.ModuleList):
        module.to_out[0] = projection
    else:
        module.to_out = projection


def is_target(name: str, targets: tuple[str, ...]) -> bool:
    """An attention module named ``name`` is targeted: the last part of its name is one of ``targets``, or a target
    with a dot matches its whole name as a glob (``transformer_blocks.*.attn``: the blocks' attention, not another
    stage's attention of the same name)."""
    return name.rsplit(".", 1)[-1] in targets or any("." in t and fnmatch.fnmatchcase(name, t) for t in targets)


def insert_adapters(
    denoiser: nn.Module,
    targets: tuple[str, ...] = ("attn1", "attn2"),
    reduction: int = 8,
    heads: int = 4,
    time_embedding: str | None = None,
) -> dict[str, TimeAwareAdapter]:
    """Put a zero-initialised adapter before the output projection of every attention module whose name ends with
    one of ``targets`` (``attn1`` self-, ``attn2`` cross-attention of UNet/DiT/PixArt blocks; ``attn`` the joint
    attention of SD3 and Flux, whose image stream gets the adapter (its ``to_out``; the text stream's ``to_add_out``
    and Flux's single blocks, which have no output projection of their own, get none; FLUX.2's single blocks share
    theirs with the MLP and get none either); ``attention`` for the mid-block attention of unconditional UNets).
    ``time_embedding``: the module whose output is the time embedding (``TimeEmbeddingTap``). Returns the adapters by
    attention name."""
    tap = TimeEmbeddingTap(denoiser, time_embedding)
    adapters = {}
    for name, module in list(denoiser.named_modules()):
        projection = output_projection(module) if is_target(name, targets) else None
        if projection is not None:
            if isinstance(projection, AdaptedProjection):
                raise ValueError(f"attention {name!r} already has an adapter")
            adapter = TimeAwareAdapter(projection.in_features, tap.dim, reduction, heads).to(
                projection.weight.device, projection.weight.dtype
            )
            set_output_projection(module, AdaptedProjection(projection, adapter, tap))
            adapters[name] = adapter
    if not adapters:
        raise ValueError(f"A3FTA: no attention module named {list(targets)} in the denoiser")
    return adapters


def adapter_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights, keyed ``<attention name>.<parameter>``."""
    return {
        f"{name}.{key}": value.detach().clone()
        for name, module in denoiser.named_modules()
        if isinstance(output_projection(module), AdaptedProjection)
        for key, value in output_projection(module).adapter.state_dict().items()
    }


def without_adapters(denoiser: nn.Module) -> nn.Module:
    """Unwrap every adapted projection in place (the plain diffusers module); returns ``denoiser``."""
    for module in denoiser.modules():
        if isinstance(output_projection(module), AdaptedProjection):
            set_output_projection(module, output_projection(module).linear)
    return denoiser


def save_adapters(denoiser: nn.Module, folder: Path, config: dict) -> Path:
    """Write the adapters beside an exported pipeline: ``<folder>/a3fta_adapters/`` (config.json, weights)."""
    from safetensors.torch import save_file

    target = Path(folder) / ADAPTER_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_state_dict(denoiser).items()}, target / "adapters.safetensors")
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def load_adapters(denoiser: nn.Module, folder: str | Path) -> dict[str, TimeAwareAdapter]:
    """Insert adapters into a plain denoiser as ``save_adapters`` described them and load their weights (e.g.
    ``load_adapters(DiffusionPipeline.from_pretrained(folder).unet, folder)``)."""
    from safetensors.torch import load_file

    source = Path(folder) / ADAPTER_FOLDER
    if not (source / "config.json").exists():
        raise FileNotFoundError(f"{str(source)!r} holds no A3FTA adapters (config.json)")
    config = json.loads((source / "config.json").read_text())
    adapters = insert_adapters(
        denoiser, tuple(config["targets"]), config["reduction"], config["heads"], config.get("time_embedding")
    )
    weights = load_file(source / "adapters.safetensors")
    for name, adapter in adapters.items():
        prefix = f"{name}."
        adapter.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    return adapters
