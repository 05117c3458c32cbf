"""Load or build the parts of a diffusion model: denoiser, noise scheduler, VAE, text encoders and tokenizers.

A model comes either from a diffusers folder or hub id (``pretrained``), read component by component from its
``model_index.json``, or from config dicts (tests, pretraining from scratch). Each entry of ``components`` is
``{"class": "UNet2DConditionModel", "config": {...}}`` (built fresh) or ``{"pretrained": PATH}`` /
``{"class": ..., "pretrained": PATH, "subfolder": ...}`` (loaded); the tokenizer may also be
``{"words": [...], "model_max_length": N}`` (a word-level tokenizer built offline; ``chat_template``: its chat
template, for pipelines that apply one). Entries given in ``components`` override the same entry of ``pretrained``.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_ft.core.tokenizer import build_word_tokenizer

# model_index.json names the denoiser "unet" (UNets) or "transformer" (DiT); both are the denoiser here.
DENOISER_KEYS = ("unet", "transformer")
#: Text encoders and tokenizers: any number, ``text_encoder``, ``text_encoder_2``, ... paired by their suffix.
TEXT_ENCODER_KEY = re.compile(r"text_encoder(_\d+)?")
TOKENIZER_KEY = re.compile(r"tokenizer(_\d+)?")
CORE_KEYS = ("denoiser", "scheduler", "vae")


def is_text_key(key: str) -> bool:
    return bool(TEXT_ENCODER_KEY.fullmatch(key) or TOKENIZER_KEY.fullmatch(key))


def is_component_entry(value) -> bool:
    """A ``model_index.json`` entry naming a component: ``[library, class]`` (either may be null). Other lists are
    pipeline settings (``Krea2Pipeline``'s ``text_encoder_select_layers``)."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)


def tokenizer_key(encoder_key: str) -> str:
    """``text_encoder_2`` -> ``tokenizer_2``: the tokenizer paired with a text encoder."""
    return "tokenizer" + encoder_key.removeprefix("text_encoder")


@dataclass
class Components:
    """The loaded parts. ``text_encoders`` and ``tokenizers`` map the folder's component keys (``text_encoder``,
    ``text_encoder_2``, ...) to modules, as many as the model has; ``parts.text_encoder_2`` reads the mapping
    (None when absent). ``extras``: other components the family accepts (e.g. an image encoder).
    ``pipeline_class`` and ``pipeline_config`` are the folder's ``model_index.json`` class and settings (e.g. SDXL's
    ``force_zeros_for_empty_prompt``); None and empty for a model built from configs."""

    denoiser: torch.nn.Module
    scheduler: Any
    vae: torch.nn.Module | None = None
    text_encoders: dict[str, torch.nn.Module] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    pipeline_class: str | None = None
    pipeline_config: dict = field(default_factory=dict)
    #: What the folder's ``lightning_ft.json`` records (metric backbones, a DiT export's real class count).
    declared: dict = field(default_factory=dict)

    def __getattr__(self, name: str):
        # Only reached for names that are not fields: text_encoder*, tokenizer* and extras read their mappings.
        if TEXT_ENCODER_KEY.fullmatch(name):
            return self.__dict__["text_encoders"].get(name)
        if TOKENIZER_KEY.fullmatch(name):
            return self.__dict__["tokenizers"].get(name)
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(name)

    @property
    def encoders(self) -> list[torch.nn.Module]:
        """The text encoders, in key order."""
        return [self.text_encoders[k] for k in sorted(self.text_encoders) if self.text_encoders[k] is not None]


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
    if TOKENIZER_KEY.fullmatch(key) and "words" in spec:
        try:  # every setting of the word-level builder (length, chat template, added tokens, wrapping)
            return build_word_tokenizer(**spec)
        except TypeError as error:
            raise ValueError(f"model.components.{key}: {error}") from None
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


def pipeline_class_of(pretrained: str | None) -> str | None:
    """The ``_class_name`` of a folder's (or hub id's) ``model_index.json``; None without ``pretrained``."""
    if pretrained is None:
        return None
    check_pretrained(pretrained)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(pretrained).get("_class_name")


def load_components(
    pretrained: str | None = None, components: dict | None = None, extras: tuple[str, ...] = (),
    frozen: tuple[str, ...] = (),
) -> Components:
    """Load ``pretrained`` (folder or hub id) and/or build ``components``; see the module docstring.

    ``extras``: the component keys, besides the denoiser, scheduler, VAE, text encoders and tokenizers, that the
    model's family accepts (e.g. an SD folder's ``safety_checker``): a folder's are not loaded (neither trained nor
    exported), ``components`` entries are kept in ``Components.extras``. A folder listing any other component is refused
    by name: dropping it would train and export another model (an LDM's ``vqvae`` is its autoencoder). ``frozen``:
    the keys of ``extras`` that are part of the model (its family's ``frozen_components``): a folder's are loaded
    too, into ``Components.extras``."""
    components = dict(components or {})
    unknown = [k for k in components if k not in CORE_KEYS and not is_text_key(k) and k not in extras]
    if unknown:
        raise ValueError(
            f"model.components has unknown keys {sorted(unknown)}; expected denoiser, scheduler, vae, text_encoder*, "
            f"tokenizer*{''.join(', ' + e for e in extras)}"
        )
    parts: dict[str, Any] = {"text_encoders": {}, "tokenizers": {}, "extras": {}}

    def put(key: str, value) -> None:
        if TEXT_ENCODER_KEY.fullmatch(key):
            parts["text_encoders"][key] = value
        elif TOKENIZER_KEY.fullmatch(key):
            parts["tokenizers"][key] = value
        elif key in extras:
            parts["extras"][key] = value
        else:
            parts[key] = value

    if pretrained is not None:
        check_pretrained(pretrained)
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(pretrained)
        parts["pipeline_class"] = index.get("_class_name")
        parts["pipeline_config"] = {
            k: v for k, v in index.items() if not k.startswith("_") and not is_component_entry(v)
        }
        record = Path(pretrained).expanduser() / "lightning_ft.json"
        if record.is_file():
            import json

            parts["declared"] = json.loads(record.read_text())
        listed = {n: v for n, v in index.items() if not n.startswith("_") and is_component_entry(v)}
        strange = [f"{n} ({v[1]})" for n, v in listed.items()
                   if v[1] is not None and n not in DENOISER_KEYS and n not in CORE_KEYS and not is_text_key(n)
                   and n not in extras and n not in components]  # fmt: skip
        if strange:
            raise ValueError(
                f"model.pretrained={pretrained!r}: its model_index.json ({parts['pipeline_class']}) lists components "
                f"lightning-ft does not know: {', '.join(strange)}. Training without them would train and export "
                "another model, so the folder is refused"
            )
        for name, value in listed.items():
            if value[1] is None or (name in extras and name not in frozen):  # optional parts it does not use
                continue
            key = "denoiser" if name in DENOISER_KEYS else name
            if key in components:
                continue
            local = Path(pretrained).expanduser()
            if local.is_dir() and not (local / name).is_dir():
                # diffusers would say only "no file named config.json found in directory <folder>".
                raise FileNotFoundError(
                    f"model.pretrained={pretrained!r}: its model_index.json lists the {key} {name!r} "
                    f"({value[1]}), but the folder has no {name}/ subfolder"
                )
            put(key, _load_pretrained_entry(value[1], pretrained, name))
    for key, spec in components.items():
        if spec is not None:
            put(key, _build_entry(key, spec))
        elif is_text_key(key):  # an explicit None drops the folder's component (e.g. SD3 without T5)
            parts["text_encoders"].pop(key, None)
            parts["tokenizers"].pop(key, None)
        else:
            put(key, None)
    for required in ("denoiser", "scheduler"):
        if parts.get(required) is None:
            raise ValueError(f"the model has no {required}: give model.pretrained or model.components.{required}")
    paired = {"text_encoder" + k.removeprefix("tokenizer") for k in parts["tokenizers"]}
    for encoder in sorted(set(parts["text_encoders"]) | paired):
        if (parts["text_encoders"].get(encoder) is None) != (parts["tokenizers"].get(tokenizer_key(encoder)) is None):
            raise ValueError(
                f"model: a text encoder needs a tokenizer and vice versa "
                f"(components.{encoder}/{tokenizer_key(encoder)})"
            )
    return Components(**parts)
