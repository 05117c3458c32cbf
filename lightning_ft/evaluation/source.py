"""What ``python -m lightning_ft.evaluate PATH`` evaluates: the model (a run folder's export, or an export folder),
the prompts, the reference images, and the model loaded back as its users load it.

A run folder is what a fit writes (``runs/<name>/lightning_logs/version_N``): ``config.yaml`` (the resolved config,
whose ``data.init_args`` name the data: ``instance_dir``, ``heldout_dir``, ``instance_prompt``, ``sample_prompts``)
and ``export/`` (or the ``DiffusersExport`` callback's ``dirpath``). An export folder is a diffusers folder
(``model_index.json``), usually with the ``lightning_ft.json`` that declares its metric backbones; an export inside
a run folder is evaluated with that run's config.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lightning_ft.callbacks.corruption_monitor import unit_pixels
from lightning_ft.data.folder import list_images, load_images

#: Sampling settings a run's ``model.init_args`` give its export back (the rest of them are about training).
SAMPLING_KEYS = ("sample_steps", "guidance_scale", "sample_resolution", "sample_scheduler", "sample_scheduler_kwargs",
                 "max_sequence_length")  # fmt: skip


@dataclass
class Target:
    """The model to evaluate: its export folder, the run folder it came from (None for an export alone) and that
    run's resolved config (empty without one)."""

    export: Path
    run: Path | None = None
    config: dict = field(default_factory=dict)

    @property
    def config_file(self) -> str:
        return str(self.run / "config.yaml") if self.run else "no config.yaml"

    def section(self, key: str) -> dict:
        entry = self.config.get(key) or {}
        return (entry.get("init_args") or {}) if isinstance(entry, dict) else {}

    @property
    def data(self) -> dict:
        return self.section("data")


def _read_config(run: Path) -> dict:
    file = run / "config.yaml"
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{file}: not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: holds no mapping")
    return config


def _export_dir(run: Path, config: dict) -> Path:
    """The run's export: the ``DiffusersExport`` callback's ``dirpath`` when its config sets one, else ``export/``."""
    callbacks = ((config.get("trainer") or {}).get("callbacks")) or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("DiffusersExport"):
            dirpath = (callback.get("init_args") or {}).get("dirpath")
            if dirpath:
                return Path(dirpath)
    return run / "export"


def resolve_target(path: str | Path) -> Target:
    """The ``Target`` of ``path`` (a run folder or an export folder); a path that is neither fails naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist (expected a run folder or an export folder)")
    if (path / "model_index.json").is_file():
        run = path.parent if (path.parent / "config.yaml").is_file() else None
        return Target(path, run, _read_config(run) if run else {})
    if (path / "config.yaml").is_file():
        config = _read_config(path)
        export = _export_dir(path, config)
        if not (export / "model_index.json").is_file():
            what = "holds no model_index.json" if export.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"{path}: its export {str(export)!r} {what}: the run had no DiffusersExport, ended before it, or "
                "exported a LoRA alone; evaluate a full diffusers export"
            )
        return Target(export, path, config)
    if (path / "lightning_ft.json").is_file():
        raise FileNotFoundError(f"{path}: holds no model_index.json (a LoRA-only export?); evaluate a full diffusers "
                                "export")  # fmt: skip
    raise FileNotFoundError(
        f"{path}: neither a run folder (config.yaml and export/) nor an export folder (model_index.json)"
    )


# ---------------------------------------------------------------------------------------------------- prompts
def read_prompt_file(file: str | Path) -> list[str]:
    """One prompt per line; empty lines and lines starting with ``#`` are skipped."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: prompt file {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts: prompt file {str(path)!r} holds no prompt (one per line)")
    return prompts


def choose_prompts(target: Target, prompt_file: str | None) -> tuple[list[str], str]:
    """The prompts and where they came from: ``--prompts FILE``, else the data config's ``sample_prompts`` (the
    recontextualisation prompts), else its ``instance_prompt``."""
    if prompt_file:
        return read_prompt_file(prompt_file), f"--prompts {prompt_file}"
    data = target.data
    if data.get("sample_prompts"):
        return [str(p) for p in data["sample_prompts"]], f"data.sample_prompts of {target.config_file}"
    if data.get("instance_prompt"):
        return [str(data["instance_prompt"])], f"data.instance_prompt of {target.config_file}"
    raise ValueError(f"{target.export}: no prompts: {target.config_file} names no data.sample_prompts nor "
                     "data.instance_prompt; give --prompts FILE (one prompt per line)")  # fmt: skip


# ------------------------------------------------------------------------------------------------- references
@dataclass
class References:
    files: list[Path]
    key: str  # what named the folder: --references, data.heldout_dir or data.instance_dir
    folder: Path

    @property
    def description(self) -> str:
        text = f"{len(self.files)} images of {self.key} ({self.folder})"
        return text + ("; references: the training images" if self.key == "data.instance_dir" else "")

    def pixels(self, size: int):
        """The references centre-cropped to ``size`` px, float (N, 3, size, size) in [0, 1], as samples come."""
        return unit_pixels(load_images(self.files, self.key), size)


def choose_references(target: Target, folder: str | None) -> References:
    """``--references DIR``, else the data config's ``heldout_dir``, else its ``instance_dir`` (the training
    images); a folder that does not exist or holds no image fails naming the key."""
    if folder:
        key = named = "--references"
    else:
        data = target.data
        key = "data.heldout_dir" if data.get("heldout_dir") else "data.instance_dir"
        folder = data.get("heldout_dir") or data.get("instance_dir")
        if not folder:
            raise ValueError(f"{target.export}: no reference images: {target.config_file} names no data.heldout_dir "
                             "nor data.instance_dir; give --references DIR")  # fmt: skip
        named = f"{key} (in {target.config_file})"
    return References(list_images(folder, named), key, Path(folder).expanduser())


# ------------------------------------------------------------------------------------------------------ model
def loader_for(export: Path):
    """The class that loads ``export`` back: the method whose inserted modules it holds, else ``DiffusionBase``;
    with the folder of those modules (None)."""
    from lightning_ft import methods
    from lightning_ft.core.base import EXPORT_FOLDERS, DiffusionBase

    for sub, owner in EXPORT_FOLDERS.items():
        if (export / sub).is_dir():
            return getattr(methods, owner), sub
    return DiffusionBase, None


def load_model(target: Target, device: str = "cpu"):
    """The export as a module that samples (``generate``), with the run's sampling settings; an export of a method
    that inserts modules is loaded by that method (with the settings its modules were saved with)."""
    cls, sub = loader_for(target.export)
    model = target.section("model")
    kwargs = {k: model[k] for k in SAMPLING_KEYS if model.get(k) is not None}
    if sub is not None:
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "pretrained"}
        saved = json.loads((target.export / sub / "config.json").read_text())
        kwargs.update({k: v for k, v in saved.items() if k in accepted})
    module = cls(pretrained=str(target.export), **kwargs)
    return module.to(device).eval()
