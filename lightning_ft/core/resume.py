"""Resuming: read a checkpoint, check that it fits the module the config describes, and say what changed.

The config and the command line win over the checkpoint: a resumed run is the module of the config, with the
checkpoint's trainable weights, optimizer and loop state put back. So the checkpoint must hold exactly the
trainable weights of that module: another method class, another trainable set, or a setting that changes the
weights' shapes (another LoRA rank, other LoRA targets, a method's inserted modules) is refused, naming both
sides. Settings that do not change the weights (learning rate, number of steps, sampling) apply from the resumed
step on, and are listed so the run's log says what differs from the checkpoint's run.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

#: Hyperparameters LightningCLI adds to a module's own (how to re-instantiate it), not settings.
CLI_KEYS = ("_class_path", "_instantiator")


def method_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict:
    """Load a Lightning checkpoint on the CPU; a missing file or one that is not a checkpoint fails naming ``key``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise ValueError(f"{key}={str(path)!r} is not a Lightning checkpoint (not a file written by torch.save)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{key}={str(path)!r} is not a Lightning checkpoint (torch.load: {first[:200]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise ValueError(f"{key}={str(path)!r} is a torch file but not a Lightning checkpoint (no state_dict)")
    return checkpoint


def _resolve_class_path(class_path: str) -> str:
    """The defining module's name for a class path such as ``lightning_ft.methods.DreamBooth`` (a re-export)."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return method_name(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError):
        return class_path


def checkpoint_method(checkpoint: dict) -> str | None:
    """The class that wrote ``checkpoint`` (None when the checkpoint does not say)."""
    written = checkpoint.get("lightning_ft", {}).get("method")
    if written:
        return written
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path")
    return _resolve_class_path(class_path) if class_path else None


def changed_settings(module, checkpoint: dict) -> dict[str, tuple]:
    """``{key: (checkpoint's value, this module's value)}`` for the module settings that differ."""
    saved = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k not in CLI_KEYS}
    mine = {k: v for k, v in dict(module.hparams).items() if k not in CLI_KEYS}
    differ = {}
    for key in sorted(set(saved) | set(mine)):
        old, new = saved.get(key), mine.get(key)
        # YAML and the checkpoint round-trip tuples as lists: (0.9, 0.999) and [0.9, 0.999] are one setting.
        if (list(old) if isinstance(old, tuple) else old) != (list(new) if isinstance(new, tuple) else new):
            differ[key] = (old, new)
    return differ


def check_checkpoint_fits(module, checkpoint: dict, where: str = "ckpt_path") -> None:
    """Raise ``ValueError`` naming both sides when ``checkpoint`` cannot be resumed into ``module``."""
    written_by, mine = checkpoint_method(checkpoint), method_name(type(module))
    if written_by is not None and written_by != mine:
        raise ValueError(
            f"{where} was written by {written_by}, but model.class_path is {mine}: a checkpoint resumes only the "
            "method that wrote it (give that method's class_path, or start without --ckpt_path)"
        )
    differ = changed_settings(module, checkpoint)
    # A checkpoint that records no settings (written by hand, not by a Trainer) is judged by its weights alone.
    if "trainable" in differ and "trainable" in checkpoint.get("hyper_parameters", {}):
        old, new = differ["trainable"]
        raise ValueError(
            f"{where} trains model.trainable={old!r}, but the config says model.trainable={new!r}: resume with "
            f"--model.trainable {old}, or start a new run without --ckpt_path"
        )
    params = dict(module.named_parameters())
    wanted = module.trainable_state_keys()
    state = checkpoint["state_dict"]
    missing = sorted(wanted - set(state))
    extra = sorted(set(state) - wanted)
    reshaped = sorted(k for k in wanted & set(state) if tuple(state[k].shape) != tuple(params[k].shape))
    if not (missing or extra or reshaped):
        return
    problems = []
    if missing:
        problems.append(f"lacks {len(missing)} trainable weights of this model (e.g. {missing[:2]})")
    if extra:
        problems.append(f"holds {len(extra)} weights this model does not train (e.g. {extra[:2]})")
    if reshaped:
        k = reshaped[0]
        problems.append(f"has {len(reshaped)} weights of another shape (e.g. {k}: {tuple(state[k].shape)} in the "
                        f"checkpoint, {tuple(params[k].shape)} here)")  # fmt: skip
    settings = ", ".join(f"model.{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in differ.items())
    raise ValueError(
        f"{where} cannot be resumed into this model, whose settings shape its weights otherwise "
        f"({settings or 'no setting differs: another pretrained model?'}): it {'; it '.join(problems)}. Resume with "
        "the checkpoint's settings, or start a new run without --ckpt_path"
    )


def describe_changes(module, checkpoint: dict, max_steps: int | None = None) -> list[str]:
    """Human-readable ``key: old -> new`` lines for what this resumed run changes (settings and step budget)."""
    lines = [f"model.{k}: {old!r} -> {new!r}" for k, (old, new) in changed_settings(module, checkpoint).items()]
    saved_steps = checkpoint.get("lightning_ft", {}).get("max_steps")
    if max_steps is not None and saved_steps is not None and saved_steps != max_steps:
        lines.append(f"trainer.max_steps: {saved_steps} -> {max_steps}")
    return lines
