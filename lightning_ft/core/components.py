"""Load or build the parts of a diffusion model: denoiser, noise scheduler, VAE, text encoders and tokenizers.

A model comes either from a diffusers folder or hub id (``pretrained``), read component by component from its
``model_index.json``, or from config dicts (tests, pretraining from scratch). Each entry of ``components`` is
``{"class": "UNet2DConditionModel", "config": {...}}`` (built fresh) or ``{"pretrained": PATH}`` /
``{"class": ..., "pretrained": PATH, "subfolder": ...}`` (loaded); the tokenizer may also be
``{"words": [...], "model_max_length": N}`` (a word-level tokenizer built offline). Entries given in
``components`` override the same entry of ``pretrained``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_ft.core.tokenizer import build_word_tokenizer

# model_index.json names the denoiser "unet" (UNets) or "transformer" (DiT); both are the denoiser here.
DENOISER_KEYS = ("unet", "transformer")
TEXT_ENCODER_KEYS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_KEYS = ("tokenizer", "tokenizer_2", "tokenizer_3")
COMPONENT_KEYS = ("denoiser", "scheduler", "vae", *TEXT_ENCODER_KEYS, *TOKENIZER_KEYS)


@dataclass
class Components:
    """The loaded parts; the optional ones are ``None`` when the model has none. ``pipeline_class`` and
    ``pipeline_config`` are the folder's ``model_index.json`` class and settings (e.g. SDXL's
    ``force_zeros_for_empty_prompt``); None and empty for a model built from configs."""

    denoiser: torch.nn.Module
    scheduler: Any
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: Any = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: Any = None
    pipeline_class: str | None = None
    pipeline_config: dict = field(default_factory=dict)
    #: What the folder's ``lightning_ft.json`` records (metric backbones, a DiT export's real class count).
    declared: dict = field(default_factory=dict)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]


def _import_class(name: str):
    """Find a component class by name in diffusers, then transformers (a dotted path is imported as given)."""
    if "." in name:
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    for library in ("diffusers", "transformers"):
        module = importlib.import_module(library)
        if hasattr(module, name):
            return getattr(module, name)
    raise ValueError(f"unknown component class {name!r}: not found in diffusers or transformers")


def check_pretrained(pretrained: str, key: str = "model.pretrained") -> None:
    """Fail fast, naming the config key, when a local ``pretrained`` path does not exist or is not a model."""
    path = Path(pretrained).expanduser()
    if path.exists():
        if path.is_dir() and not any((path / f).exists() for f in ("model_index.json", "config.json")):
            raise FileNotFoundError(f"{key}={pretrained!r} is a folder but holds no model_index.json or config.json")
        return
    if pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
        raise FileNotFoundError(f"{key}={pretrained!r} does not exist (neither a local folder nor a hub id 'org/name')")


def _load_pretrained_entry(cls_name: str, path: str, subfolder: str | None):
    cls = _import_class(cls_name)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    return cls.from_pretrained(path, **kwargs)


def _build_entry(key: str, spec: dict):
    if not isinstance(spec, dict):
        raise TypeError(f"model.components.{key} must be a mapping, got {type(spec).__name__}: {spec!r}")
    if key in TOKENIZER_KEYS and "words" in spec:
        return build_word_tokenizer(spec["words"], spec.get("model_max_length", 16))
    if "pretrained" in spec:
        path = spec["pretrained"]
        check_pretrained(path, f"model.components.{key}.pretrained")
        if "class" not in spec:
            return _load_from_folder_config(path, spec.get("subfolder"), key)
        return _load_pretrained_entry(spec["class"], path, spec.get("subfolder"))
    if "class" not in spec or "config" not in spec:
        raise ValueError(
            f"model.components.{key} needs 'class' and 'config' (or 'pretrained'); got keys {sorted(spec)}"
        )
    cls = _import_class(spec["class"])
    if key == "scheduler":
        return cls.from_config(spec["config"])
    # transformers models are built from their config class (CLIPTextModelWithProjection from a CLIPTextConfig).
    config_cls = getattr(cls, "config_class", None)
    if config_cls is not None and cls.__module__.startswith("transformers"):
        return cls(config_cls(**spec["config"]))
    return cls(**spec["config"])


def _load_from_folder_config(path: str, subfolder: str | None, key: str):
    """Load a single diffusers/transformers component folder whose class is named in its own config."""
    import json

    folder = Path(path) / (subfolder or "")
    for config_name in ("config.json", "scheduler_config.json"):
        config_file = folder / config_name
        if config_file.exists():
            config = json.loads(config_file.read_text())
            name = config.get("_class_name") or (config.get("architectures") or [None])[0]
            if name:
                return _load_pretrained_entry(name, path, subfolder)
    if (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    raise FileNotFoundError(f"model.components.{key}: no config naming a class in {folder}")


def load_components(pretrained: str | None = None, components: dict | None = None) -> Components:
    """Load ``pretrained`` (folder or hub id) and/or build ``components``; see the module docstring."""
    components = dict(components or {})
    unknown = set(components) - set(COMPONENT_KEYS)
    if unknown:
        raise ValueError(f"model.components has unknown keys {sorted(unknown)}; expected some of {COMPONENT_KEYS}")
    parts: dict[str, Any] = {}
    if pretrained is not None:
        check_pretrained(pretrained)
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(pretrained)
        parts["pipeline_class"] = index.get("_class_name")
        parts["pipeline_config"] = {
            k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, (list, tuple))
        }
        record = Path(pretrained).expanduser() / "lightning_ft.json"
        if record.is_file():
            import json

            parts["declared"] = json.loads(record.read_text())
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, (list, tuple)) or value[1] is None:
                continue
            key = "denoiser" if name in DENOISER_KEYS else name
            if key in COMPONENT_KEYS and key not in components:
                local = Path(pretrained).expanduser()
                if local.is_dir() and not (local / name).is_dir():
                    # diffusers would say only "no file named config.json found in directory <folder>".
                    raise FileNotFoundError(
                        f"model.pretrained={pretrained!r}: its model_index.json lists the {key} {name!r} "
                        f"({value[1]}), but the folder has no {name}/ subfolder"
                    )
                parts[key] = _load_pretrained_entry(value[1], pretrained, name)
    for key, spec in components.items():
        if spec is not None:
            parts[key] = _build_entry(key, spec)
    for required in ("denoiser", "scheduler"):
        if required not in parts:
            raise ValueError(f"the model has no {required}: give model.pretrained or model.components.{required}")
    for encoder, tokenizer in zip(TEXT_ENCODER_KEYS, TOKENIZER_KEYS):
        if (parts.get(encoder) is None) != (parts.get(tokenizer) is None):
            raise ValueError(
                f"model: a text encoder needs a tokenizer and vice versa (components.{encoder}/{tokenizer})"
            )
    return Components(**parts)
