"""Which parameters of the denoiser train: ``full``, ``attention``, ``lora`` (PEFT) or ``none``.

LoRA goes through diffusers' ``add_adapter`` when the denoiser has it (UNets, SD3, Flux) and through PEFT's
``inject_adapter_in_model`` otherwise (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``), with the same PEFT
config either way; the config is then kept in ``denoiser.peft_config["default"]`` as diffusers keeps it.
``merged_copy`` gives the plain model of the base architecture, ``save_peft_lora`` / ``load_peft_lora`` write and read
PEFT's own adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for either kind.

``lora_variant`` picks the PEFT method behind ``trainable='lora'`` (``adapter_config``): ``lora``, ``dora``
(``LoraConfig(use_dora=True)``), ``loha`` (``LoHaConfig``), ``lokr`` (``LoKrConfig``) or ``oft`` (``OFTConfig``).
diffusers' ``add_adapter`` takes any PEFT config and its ``fuse_lora`` / ``unload_lora`` merge and remove any PEFT
tuner layer, so every variant goes in, merges and exports the way LoRA does; only diffusers' LoRA file loader
(``load_lora_weights``) is limited to LoRA and DoRA, so the other three are written as PEFT adapter folders.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_ft.attention import attention_parameter_names, is_attention

TRAINABLE_MODES = ("full", "attention", "lora", "none", "controlnet")
#: The PEFT methods ``trainable='lora'`` can train (``model.lora_variant``).
LORA_VARIANTS = ("lora", "dora", "loha", "lokr", "oft")
#: The variants diffusers' LoRA loaders (``save_lora_weights`` / ``load_lora_weights``) read; the others are written
#: as PEFT adapter folders.
DIFFUSERS_LORA_VARIANTS = ("lora", "dora")
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
__all__ = ["attention_parameter_names", "is_attention"]  # re-exported: the trainable set's vocabulary


def adapter_config(
    variant: str,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    dropout: float = 0.0,
):
    """The PEFT config of ``variant`` from the LoRA settings, mapped as kohya / LyCORIS / SimpleTuner use them:

    - ``lora``: ``LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout)``, scale ``alpha / rank``, ``up``
      zero-initialised and ``down`` Gaussian (diffusers' DreamBooth-LoRA recipe);
    - ``dora``: the same with ``use_dora=True`` (diffusers' scripts' ``--use_dora``): a per-output magnitude vector
      starting at the pretrained weight's norms, so the model is still unchanged at step 0;
    - ``loha``: ``LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout)``: two rank-``rank`` pairs whose Hadamard
      product is the update (rank up to ``rank**2``), scale ``alpha / rank`` as LyCORIS's ``dim`` / ``alpha``;
    - ``lokr``: ``LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout)``, PEFT's default factorisation
      (``decompose_factor=-1``); its second Kronecker factor is a full matrix once ``rank`` reaches half its size
      (LyCORIS's "dim 10000" trick), and the scale stays ``alpha / rank`` there too (LyCORIS then forces 1: set
      ``lora_alpha`` equal to ``lora_rank`` for that);
    - ``oft``: ``OFTConfig(r=rank, oft_block_size=0)``: ``rank`` is the number of orthogonal blocks per layer (the
      block size is ``in_features / rank``; PEFT moves ``rank`` to the nearest divisor, with a warning), as kohya's
      OFT ``network_dim`` and the BNN code's OFT ``--r`` (4). LyCORIS's ``diag-oft`` ``dim`` is the block size
      instead: set ``lora_rank = in_features / dim``. OFT rotates the weight and has no scale, so ``alpha`` must be
      None; PEFT's OFT layer never applies its ``module_dropout``, so ``dropout`` must be 0 (``checks.py``
      refuses both by name rather than ignore them). PEFT's defaults otherwise: no COFT constraint (the BNN
      scripts do not pass ``--coft`` either), the Cayley-Neumann series for the Cayley transform.

    ``alpha`` None is ``rank`` (scale 1). LoHa and LoKr have no input dropout in PEFT: ``rank_dropout`` (drop rows
    of the update while training) is their dropout."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    targets = list(target_modules)
    scale_alpha = alpha if alpha is not None else rank
    if variant in ("lora", "dora"):
        return LoraConfig(
            r=rank,
            lora_alpha=scale_alpha,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
            use_dora=variant == "dora",
        )
    if variant == "loha":
        return LoHaConfig(r=rank, alpha=scale_alpha, rank_dropout=dropout, target_modules=targets)
    if variant == "lokr":
        return LoKrConfig(r=rank, alpha=scale_alpha, rank_dropout=dropout, target_modules=targets)
    if variant == "oft":
        if alpha is not None or dropout:
            raise ValueError(
                f"model.lora_variant='oft' has no scale and no dropout: model.lora_alpha={alpha!r} and "
                f"model.lora_dropout={dropout!r} must be null and 0"
            )
        return OFTConfig(r=rank, oft_block_size=0, target_modules=targets)
    raise ValueError(f"model.lora_variant={variant!r} is not one of {LORA_VARIANTS}")


def lora_variant_of(config) -> str:
    """The ``lora_variant`` a PEFT config trains (the inverse of ``adapter_config``)."""
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if kind == "lora":
        return "dora" if getattr(config, "use_dora", False) else "lora"
    if kind not in LORA_VARIANTS:
        raise ValueError(f"a PEFT adapter of type {kind!r} is not one of the LoRA variants {LORA_VARIANTS}")
    return kind


def apply_trainable(
    denoiser: torch.nn.Module,
    mode: str,
    lora_rank: int = 4,
    lora_alpha: float | None = None,
    lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    lora_dropout: float = 0.0,
    lora_variant: str = "lora",
) -> None:
    """Set ``requires_grad`` on ``denoiser`` for ``mode``; for ``lora`` also insert the PEFT adapter of
    ``lora_variant`` (``adapter_config``: settings mapped per variant). ``controlnet`` freezes the denoiser (the
    ControlNet beside it trains: ``DiffusionBase.configure_trainable``).

    LoRA follows diffusers' DreamBooth-LoRA recipe: ``up`` zero-initialised so the model is unchanged at step 0,
    scale ``alpha / rank`` (``alpha`` defaults to ``rank``: scale 1). Every variant starts as the identity too."""
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"model.trainable={mode!r} is not one of {TRAINABLE_MODES}")
    if mode == "lora":
        config = adapter_config(lora_variant, lora_rank, lora_alpha, lora_target_modules, lora_dropout)
        denoiser.requires_grad_(False)
        try:
            _add_lora(denoiser, config)
        except ValueError as error:
            raise ValueError(
                f"model.lora_target_modules={list(lora_target_modules)} matched no layer: {error}"
            ) from None
        return
    if lora_variant != "lora":
        raise ValueError(f"model.lora_variant={lora_variant!r} needs model.trainable='lora', not {mode!r}")
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
    """True when a PEFT adapter layer sits anywhere in ``denoiser`` (diffusers ``add_adapter`` or PEFT injection)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in denoiser.modules())


def default_lora_targets(denoiser: torch.nn.Module) -> tuple[str, ...]:
    """The default ``lora_target_modules`` of ``denoiser``: ``DEFAULT_LORA_TARGETS``, the q/k/v/out projections of
    every diffusers ``Attention``, for UNets and for DiT / PixArt transformers alike (their blocks use the same
    ``Attention`` class, so the same names match; in PixArt that includes the text cross-attention ``attn2``, as in
    a UNet). diffusers has no PixArt or DiT LoRA training example to follow; its DreamBooth-LoRA UNet recipe targets
    exactly these four, so the feed-forward layers are not added. Raises ValueError, naming
    ``model.lora_target_modules``, when some target names no linear inside an ``Attention``."""
    found = set()
    for module in denoiser.modules():
        if is_attention(module):
            for target in DEFAULT_LORA_TARGETS:
                try:
                    layer = module.get_submodule(target)
                except AttributeError:
                    continue
                if isinstance(layer, torch.nn.Linear) or hasattr(layer, "base_layer"):
                    found.add(target)
    missing = [t for t in DEFAULT_LORA_TARGETS if t not in found]
    if missing:
        raise ValueError(
            f"{type(denoiser).__name__} has no attention projection named {missing}: set model.lora_target_modules"
        )
    return DEFAULT_LORA_TARGETS


def _add_lora(denoiser: torch.nn.Module, config) -> None:
    """Insert the adapter ``default`` of ``config`` (the PEFT config of any of ``LORA_VARIANTS``): diffusers'
    ``add_adapter`` when the model has it, else PEFT's ``inject_adapter_in_model``. Either way the adapter weights
    train, the config is readable as ``denoiser.peft_config["default"]``, and a target list that matches nothing
    raises ValueError."""
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(config)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, denoiser, adapter_name="default")
    # PEFT also sets this attribute itself; set it here so the rest of the code (``lora_state_dict``, the exported
    # adapter metadata) does not depend on that detail.
    denoiser.peft_config = {"default": config}


def _set_child(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def merged_copy(denoiser: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``denoiser`` with its LoRA merged into the base weights and the LoRA layers removed: a plain
    diffusers model of the original class and parameter names. ``denoiser`` is untouched (a plain copy when it has
    no LoRA). Every variant merges through its PEFT layer's own ``merge`` (DoRA rescales the merged rows, LoHa and
    LoKr add their update, OFT multiplies the weight by its block-orthogonal rotation).

    For models with diffusers' adapter API this is its ``fuse_lora()`` + ``unload_lora()``. For injected adapters
    the merge is done here: PEFT's merge-and-unload (``LoraModel.merge_and_unload``) needs a ``PeftModel`` /
    ``LoraModel`` wrapper, and its public functions for plain models (``peft.functional``) inject, set and delete
    adapters but do not merge. So each adapter layer merges itself (``BaseTunerLayer.merge``, public) and is then
    replaced by its base layer (``get_base_layer``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(denoiser)
    if not has_lora(merged):
        return merged
    if hasattr(merged, "fuse_lora") and getattr(merged, "_hf_peft_config_loaded", False):
        merged.fuse_lora()
        merged.unload_lora()
        return merged
    names = [n for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in names:
        layer = merged.get_submodule(name)
        layer.merge()
        _set_child(merged, name, layer.get_base_layer())
    if "peft_config" in vars(merged):
        del merged.peft_config
    return merged


PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def _single_adapter_config(denoiser: torch.nn.Module):
    configs = getattr(denoiser, "peft_config", None)
    if not has_lora(denoiser) or not configs:
        raise ValueError("the denoiser has no LoRA adapter (model.trainable='lora')")
    if len(configs) != 1:
        raise ValueError(f"the denoiser has {len(configs)} adapters {sorted(configs)}; one is expected")
    return next(iter(configs.items()))


def save_peft_lora(denoiser: torch.nn.Module, folder: str | Path, state: dict | None = None) -> Path:
    """Write the adapter of ``denoiser`` in PEFT's own format: ``adapter_config.json`` (its PEFT config: any
    ``lora_variant``) and ``adapter_model.safetensors`` (``get_peft_model_state_dict``: keys without the adapter
    name). Works for diffusers-adapter and injected models alike; ``load_peft_lora`` (or PEFT's
    ``PeftModel.from_pretrained`` / ``set_peft_model_state_dict``) reads it back. ``state``: the weights to write
    instead of the denoiser's own (e.g. a Bayesian adapter's means); without it, Bayesian layers must be made plain
    first (``lightning_ft.nn.bayesian.plain_copy``)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter, config = _single_adapter_config(denoiser)
    # Layers that sample their weights (nn.bayesian's mark them ``stochastic``) have no plain weight to write.
    if state is None and any(getattr(m, "stochastic", False) for m in denoiser.modules()):
        raise ValueError("save_peft_lora: the LoRA holds Bayesian layers; save a plain_copy of the denoiser instead")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = get_peft_model_state_dict(denoiser, adapter_name=adapter)
    weights = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(weights, str(folder / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    return folder


def load_peft_lora(denoiser: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """Put the adapter that ``save_peft_lora`` wrote into ``denoiser`` (a plain model of the same architecture), in
    place: the config read back (``PeftConfig.from_pretrained``: the class its ``peft_type`` names, so any
    ``lora_variant``) is inserted as adapter ``default`` (diffusers' ``add_adapter`` or PEFT injection, as
    ``apply_trainable``), then its weights are loaded (``set_peft_model_state_dict``). The base stays frozen, the
    adapter weights train. Raises ValueError when the file's keys do not fit the inserted layers. Returns
    ``denoiser``."""
    from peft import PeftConfig, set_peft_model_state_dict
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"load_peft_lora: {folder / name} does not exist")
    if has_lora(denoiser):
        raise ValueError("load_peft_lora: the denoiser already has a LoRA adapter")
    config = PeftConfig.from_pretrained(str(folder))
    lora_variant_of(config)  # an adapter this code does not train is refused by name
    state = load_file(folder / PEFT_WEIGHTS_FILE)
    denoiser.requires_grad_(False)
    _add_lora(denoiser, config)
    result = set_peft_model_state_dict(denoiser, state, adapter_name="default")
    # Missing keys are reported for the whole model (its base weights too): only the adapter's own count.
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING[config.peft_type]
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if prefix in k]
    if unexpected or missing:
        raise ValueError(
            f"load_peft_lora: {folder} does not fit the denoiser (unexpected {unexpected[:5]}, missing {missing[:5]})"
        )
    return denoiser
