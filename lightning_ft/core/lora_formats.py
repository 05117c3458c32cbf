"""The file formats of a LoRA-only export (``save_pretrained(path, lora_only=True, lora_format=...)``).

- ``diffusers`` (default): the pipeline's own ``save_lora_weights`` layout (``ModelFamily.save_lora``).
- ``kohya``: one safetensors file (``KOHYA_FILE``) in the layout of kohya-ss sd-scripts, the one ComfyUI,
  AUTOMATIC1111 / Forge and diffusers' own ``load_lora_weights`` read: per layer ``<name>.lora_down.weight``,
  ``<name>.lora_up.weight`` and ``<name>.alpha`` (the layer's LoRA adds ``up @ down * alpha / rank``).

A family writes kohya files when it declares ``kohya_lora`` (the name of its converter in ``KOHYA_CONVERTERS``):

- ``unet`` (SD1.x/2.x, SDXL): the names are diffusers' ``convert_state_dict_to_kohya``
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``), the diffusers module path that
  sd-scripts itself writes for SD1.x and that ComfyUI and A1111 map onto their UNet.
- ``flux`` (Flux.1): sd-scripts names Flux layers after the original (BFL) checkpoint, where q, k and v are one layer
  (``lora_unet_double_blocks_0_img_attn_qkv``, and ``single_blocks_0_linear1`` = q, k, v and the MLP input). diffusers
  reads such files (``_convert_kohya_flux_lora_to_diffusers``) but has no converter in this direction, so the renaming
  and fusing below is ours; diffusers' ``convert_state_dict_to_kohya`` still writes the final key names.

The alpha is written here for every family: ``convert_state_dict_to_kohya`` writes alpha = rank (scale 1), which is
wrong for a LoRA trained with another ``lora_alpha`` (or rsLoRA, or per-layer patterns). The scale each PEFT layer
applies (its ``scaling``) is written as alpha = scale x rank, so a reader applies exactly the trained update.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

#: The formats of a LoRA-only export.
LORA_FORMATS = ("diffusers", "kohya")
#: The file a kohya export writes (ComfyUI's ``models/loras``, A1111's ``models/Lora`` take it as it is).
KOHYA_FILE = "lora_kohya.safetensors"


def kohya_converter(family) -> str | None:
    """The name of ``family``'s kohya converter (its ``kohya_lora`` declaration), None when it has none."""
    return getattr(family, "kohya_lora", None)


def check_lora_format(lora_format: str, family=None) -> None:
    """Raise ValueError for an unknown ``lora_format``, NotImplementedError (naming the family) when ``family`` (a
    ``ModelFamily`` instance or class) has no kohya layout."""
    if lora_format not in LORA_FORMATS:
        raise ValueError(f"lora_format={lora_format!r} is not one of {LORA_FORMATS}")
    if lora_format == "kohya" and family is not None and kohya_converter(family) not in KOHYA_CONVERTERS:
        from lightning_ft.core.families.base import REGISTRY

        supported = sorted(name for name, cls in REGISTRY.items() if kohya_converter(cls) in KOHYA_CONVERTERS)
        raise NotImplementedError(
            f"lora_format='kohya': the {family.name!r} family has no kohya LoRA layout in lightning-ft (kohya files "
            f"are written for {supported}); export it with lora_format='diffusers'"
        )


def check_kohya_adapter(denoiser: torch.nn.Module) -> None:
    """Raise NotImplementedError unless the denoiser's adapter is plain LoRA: a kohya file here holds down / up /
    alpha only, not DoRA's magnitudes nor LoHa / LoKr / OFT factors (``model.lora_variant``)."""
    for config in (getattr(denoiser, "peft_config", None) or {}).values():
        kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
        variant = "dora" if kind == "lora" and getattr(config, "use_dora", False) else kind
        if variant != "lora":
            raise NotImplementedError(
                f"lora_format='kohya' writes plain LoRA (down, up, alpha); this model's adapter is {variant!r} "
                "(model.lora_variant): export it with lora_format='diffusers'"
            )


def kohya_record(file_name: str) -> dict:
    """The ``lora`` record of a kohya export in its ``lightning_ft.json``."""
    return {
        "format": "kohya",
        "file": file_name,
        "loader": "ComfyUI (models/loras, LoraLoader), AUTOMATIC1111 / Forge (models/Lora), or diffusers' "
        f"pipe.load_lora_weights(folder, weight_name={file_name!r})",
    }


def read_record(path: str | Path) -> dict:
    """The ``lightning_ft.json`` in folder ``path`` ({} when there is none)."""
    import json

    from lightning_ft.metrics.backbones import DECLARATION

    file = Path(path) / DECLARATION
    return json.loads(file.read_text()) if file.is_file() else {}


def lora_scales(denoiser: torch.nn.Module) -> dict[str, float]:
    """Module name -> the scale its LoRA update is multiplied by (PEFT's ``scaling``: alpha / rank, alpha / sqrt(rank)
    with rsLoRA, per-layer ``rank_pattern`` / ``alpha_pattern`` included)."""
    from peft.tuners.lora import LoraLayer

    scales = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, LoraLayer) and module.scaling:
            if len(module.scaling) != 1:
                raise ValueError(f"lora_format='kohya': {name} holds adapters {sorted(module.scaling)}; one expected")
            scales[name] = float(next(iter(module.scaling.values())))
    return scales


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (down, up)}`` from a PEFT state dict (``<module>.lora_A.weight`` / ``<module>.lora_B.weight``)."""
    downs, ups = {}, {}
    for key, value in state.items():
        if key.endswith(".lora_A.weight"):
            downs[key[: -len(".lora_A.weight")]] = value
        elif key.endswith(".lora_B.weight"):
            ups[key[: -len(".lora_B.weight")]] = value
        else:
            # DoRA magnitudes, LoRA biases and the like have no place in a kohya LoRA: refuse rather than drop them.
            raise ValueError(f"lora_format='kohya': {key} is not a LoRA down or up weight (lora_A / lora_B)")
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        raise ValueError(f"lora_format='kohya': {unpaired[0]} has a LoRA down or up weight without the other")
    return {name: (downs[name], ups[name]) for name in downs}


def _kohya_layer(name: str, down: torch.Tensor, up: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """The three tensors of one layer ``name`` (a diffusers-style dotted path under ``unet.``): diffusers'
    ``convert_state_dict_to_kohya`` makes the names (``unet.a.b`` -> ``lora_unet_a_b``); the alpha it writes (the
    rank: scale 1) is replaced by the layer's trained scale."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    layer = convert_state_dict_to_kohya({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    (alpha_key,) = [key for key in layer if key.endswith(".alpha")]
    layer[alpha_key] = torch.tensor(scale * down.shape[0], dtype=torch.float32)
    return layer


def _scale_of(scales: dict[str, float], name: str) -> float:
    if name not in scales:
        raise ValueError(f"lora_format='kohya': the LoRA weights of {name} belong to no LoRA layer of the denoiser")
    return scales[name]


# ------------------------------------------------------------------------------------------------- SD1.x / SDXL
def unet_to_kohya(state: dict[str, torch.Tensor], denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A UNet's PEFT LoRA (keys without prefix) in the kohya layout: every layer under its diffusers path."""
    scales = lora_scales(denoiser)
    out = {}
    for name, (down, up) in lora_pairs(state).items():
        out.update(_kohya_layer(f"unet.{name}", down, up, _scale_of(scales, name)))
    return out


# ------------------------------------------------------------------------------------------------- Flux.1
# diffusers' FluxTransformer2DModel layer -> its layer in the original (BFL) checkpoint, whose names sd-scripts'
# Flux LoRAs use; the same correspondence as diffusers' ``_convert_kohya_flux_lora_to_diffusers`` (read the other way).
#: Fused BFL layers of a double block -> the diffusers layers stacked in their output, in order.
_FLUX_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_FLUX_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
#: A single block's ``linear1`` computes q, k, v and the MLP input at once.
_FLUX_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    # Its output is (scale, shift) in diffusers and (shift, scale) in BFL: the up rows swap halves.
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_FLUX_SWAPPED = {"norm_out.linear"}


def _flux_target(name: str) -> tuple[str, int | None, tuple[str, ...]]:
    """(BFL layer, index among the fused parts or None, the diffusers names of all its parts) of diffusers layer
    ``name``; ValueError naming it when the BFL checkpoint has no such layer."""
    for pattern, prefix, fused, plain in (
        (r"transformer_blocks\.(\d+)\.(.+)", "double_blocks", _FLUX_DOUBLE_FUSED, _FLUX_DOUBLE),
        (r"single_transformer_blocks\.(\d+)\.(.+)", "single_blocks", _FLUX_SINGLE_FUSED, _FLUX_SINGLE),
    ):
        match = re.fullmatch(pattern, name)
        if match is None:
            continue
        block, rest = match.groups()
        src, dst = name[: len(name) - len(rest)], f"{prefix}.{block}."
        if rest in plain:
            return dst + plain[rest], None, (name,)
        for target, parts in fused.items():
            if rest in parts:
                return dst + target, parts.index(rest), tuple(src + part for part in parts)
        break
    else:
        if name in _FLUX_TOP:
            return _FLUX_TOP[name], None, (name,)
    raise ValueError(f"lora_format='kohya': the Flux LoRA layer {name} has no counterpart in the kohya (BFL) layout")


def _out_features(denoiser: torch.nn.Module, name: str) -> int:
    layer = denoiser.get_submodule(name)
    layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return layer.weight.shape[0]


def _fuse(parts: list, sizes: list[int], names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA for a layer whose output stacks ``parts`` (``(down, up, scale)`` or None for a part without LoRA):
    the downs stacked (rank = their sum), the ups block-diagonal on the rows of their part, each part's scale folded
    into its up relative to the scale the fused layer carries (the largest). Exact: ``up @ down * scale``
    of the result is every part's ``up @ down * scale`` on its rows, zero on rows of parts without LoRA."""
    present = [(i, part) for i, part in enumerate(parts) if part is not None]
    scale = max((part[2] for _, part in present), key=abs) or 1.0  # any non-zero common scale is exact
    down = torch.cat([part[0] for _, part in present])
    first_up = present[0][1][1]
    up = torch.zeros(sum(sizes), down.shape[0], dtype=first_up.dtype, device=first_up.device)
    column = 0
    for i, (part_down, part_up, part_scale) in present:
        if part_up.shape[0] != sizes[i]:
            raise ValueError(
                f"lora_format='kohya': the LoRA up weight of {names[i]} has {part_up.shape[0]} rows; its layer has "
                f"{sizes[i]} outputs"
            )
        row = sum(sizes[:i])
        rank = part_down.shape[0]
        up[row : row + sizes[i], column : column + rank] = part_up * (part_scale / scale)
        column += rank
    return down, up, scale


def flux_to_kohya(state: dict[str, torch.Tensor], denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Flux.1 transformer's PEFT LoRA (keys without prefix) in sd-scripts' Flux layout (BFL layer names, q/k/v
    fused; ``lora_unet_`` as sd-scripts names the Flux transformer)."""
    scales = lora_scales(denoiser)
    pairs = lora_pairs(state)
    fused: dict[str, tuple[tuple[str, ...], dict[int, tuple]]] = {}
    out = {}
    for name, (down, up) in pairs.items():
        target, index, names = _flux_target(name)
        scale = _scale_of(scales, name)
        if index is None:
            if name in _FLUX_SWAPPED:
                up = torch.cat(up.chunk(2, dim=0)[::-1])
            out.update(_kohya_layer(f"unet.{target}", down, up, scale))
        else:
            fused.setdefault(target, (names, {}))[1][index] = (down, up, scale)
    for target, (names, found) in fused.items():
        sizes = [_out_features(denoiser, part) for part in names]
        down, up, scale = _fuse([found.get(i) for i in range(len(names))], sizes, names)
        out.update(_kohya_layer(f"unet.{target}", down, up, scale))
    return out


#: ``ModelFamily.kohya_lora`` -> the converter of the family's PEFT LoRA state dict to the kohya layout.
KOHYA_CONVERTERS = {"unet": unet_to_kohya, "flux": flux_to_kohya}


def kohya_state_dict(family, state: dict[str, torch.Tensor], denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state`` (PEFT LoRA weights of ``denoiser``, as ``save_lora`` takes them) in ``family``'s kohya layout."""
    check_lora_format("kohya", family)
    return KOHYA_CONVERTERS[kohya_converter(family)](state, denoiser)


def save_kohya_lora(path: str | Path, family, state: dict[str, torch.Tensor], denoiser: torch.nn.Module) -> Path:
    """Write ``KOHYA_FILE`` into the folder ``path``; returns the file."""
    from safetensors.torch import save_file

    weights = {k: v.detach().contiguous().cpu() for k, v in kohya_state_dict(family, state, denoiser).items()}
    file = Path(path) / KOHYA_FILE
    save_file(weights, str(file), metadata={"format": "pt", "lightning_ft.family": family.name})
    return file
