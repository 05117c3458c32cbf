"""The export folder's model card: ``README.md`` with the Hub's YAML metadata, as diffusers' training examples
write one, so that ``huggingface_hub.upload_folder(repo_id=..., folder_path=export_dir)`` publishes a documented
model.

Metadata (``huggingface_hub.ModelCardData``, serialised by the Hub client itself):

- ``base_model``: the hub id of ``model.pretrained`` when it is one (an id, or a folder of the Hub's download cache,
  ``models--owner--name/snapshots/...``). A local folder has no hub id: then no ``base_model`` is written (the Hub
  refuses an id that names no model) and the card's text names the folder and its own card's title instead.
- ``license``: the base model's, read from its card's metadata when it has one (the embedded models' cards declare
  the project's apache-2.0); else ``other``, and the text says it was not known.
- ``instance_prompt``, ``library_name: diffusers``, ``tags`` (diffusers, lightning-ft, the method, ``lora`` for LoRA
  training, the pipeline family, the task) and ``widget``: sample images written to ``images/`` in the folder.

The text states the method and its settings (the module's hyperparameters that differ from None), the data (instance
and class images, prompts, resolution) and the final metrics of the monitors, and how to load and upload the folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

DEFAULT_LICENSE = "other"
HUB_CACHE_FOLDER = re.compile(r"models--([^/\\]+?)--([^/\\]+)")
#: Hyperparameters left out of the settings table: component configs, the base model (stated apart), plumbing.
NOT_SETTINGS = ("components", "backbones", "pretrained", "_instantiator", "_class_path")


def _kebab(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def base_model_id(pretrained: str | None) -> str | None:
    """The hub id ``model.pretrained`` names, or None for a local folder that is not a hub download."""
    if not pretrained:
        return None
    text = str(pretrained)
    match = HUB_CACHE_FOLDER.search(text)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    local = text.startswith((".", "/", "~")) or Path(text).expanduser().exists()
    if local or not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        return None
    return text


def base_card(pretrained: str | None) -> ModelCard | None:
    """The model card (``README.md``) of a local base-model folder, if it has one."""
    if not pretrained:
        return None
    readme = Path(str(pretrained)).expanduser() / "README.md"
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme)
    except Exception:  # a README that is not a model card: no metadata to read
        return None


def base_title(card: ModelCard | None) -> str | None:
    """The first heading of a card's text."""
    if card is None:
        return None
    match = re.search(r"^#\s+(.+)$", card.text, re.MULTILINE)
    return match.group(1).strip() if match else None


@dataclass
class CardFacts:
    """What a card states; ``facts_from_fit`` gathers them from a finished fit."""

    method: str
    method_path: str
    settings: dict
    pretrained: str | None
    task: str = "text-to-image"  # the family's ``task`` (a tag)
    hub_task: str | None = "text-to-image"  # the family's ``hub_task`` (the Hub's pipeline_tag)
    usage: str | None = None  # the family's ``usage_example``: the line that samples the model
    scheduler: str | None = None  # the export's sampling scheduler class
    base_scheduler: str | None = None  # the base folder's scheduler class, when it differs
    pipeline_class: str | None = None
    lora_only: bool = False
    lora: dict = field(default_factory=dict)  # a LoRA export's ``lora`` record (lightning_ft.json): format, file
    steps: int | None = None
    instance_prompt: str | None = None
    class_prompt: str | None = None
    num_instance_images: int | None = None
    num_class_images: int | None = None
    resolution: int | None = None
    metrics: list[tuple[str, str, str]] = field(default_factory=list)  # (name, value, what it is)
    verdict: str | None = None
    widget: list[tuple[str, str]] = field(default_factory=list)  # (prompt, path relative to the card)
    widget_note: str | None = None
    sample_settings: dict = field(default_factory=dict)  # steps, guidance_scale


def tags_for(facts: CardFacts) -> list[str]:
    tags = ["diffusers", "lightning-ft", _kebab(facts.method)]
    if facts.settings.get("trainable") == "lora" or facts.lora_only:
        tags.append("lora")
    if facts.pipeline_class:
        tags.append(_kebab(facts.pipeline_class.removesuffix("Pipeline")))
    tags.append(facts.task)
    return list(dict.fromkeys(tags))


def card_metadata(facts: CardFacts) -> tuple[ModelCardData, str]:
    """The card's metadata and one sentence on where its license and base model come from."""
    hub_id = base_model_id(facts.pretrained)
    base = base_card(facts.pretrained)
    license_ = getattr(base.data, "license", None) if base is not None else None
    if license_:
        origin = f"The license is the base model's, as its model card declares it ({license_})."
    else:
        license_ = DEFAULT_LICENSE
        origin = ("The base model's license was not known at export (no model card with a license beside it): the "
                  "metadata says `other`; set the base model's license before publishing.")  # fmt: skip
    widget = [{"text": prompt, "output": {"url": path}} for prompt, path in facts.widget]
    data = ModelCardData(
        license=license_,
        library_name="diffusers",
        base_model=hub_id,
        instance_prompt=facts.instance_prompt,
        tags=tags_for(facts),
        widget=widget or None,
        pipeline_tag=facts.hub_task,
    )
    return data, origin


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def card_text(facts: CardFacts, origin: str) -> str:
    hub_id = base_model_id(facts.pretrained)
    title = base_title(base_card(facts.pretrained))
    if hub_id:
        base = f"[`{hub_id}`](https://huggingface.co/{hub_id})"
    elif facts.pretrained:
        base = f"`{Path(str(facts.pretrained)).name}`" + (f" ({title})" if title else "")
        base += ", a local model folder that is not on the Hub"
    else:
        base = "none: the model was built from component configs"
    what = "LoRA weights" if facts.lora_only else "A diffusers pipeline"
    lines = [f"# {facts.method} fine-tune" + (f" of {hub_id}" if hub_id else ""), ""]
    lines.append(f"{what} fine-tuned with lightning-ft's `{facts.method}` (`{facts.method_path}`)"
                 + (f" for {facts.steps} optimizer steps" if facts.steps else "") + ".")  # fmt: skip
    if facts.lora_only and facts.lora.get("format"):
        lines += ["", lora_format_line(facts.lora)]
    lines += ["", f"Base model: {base}."]
    lines += ["", "## Data", ""]
    data = []
    if facts.num_instance_images is not None:
        data.append(f"- {facts.num_instance_images} instance images"
                    + (f", prompt `{facts.instance_prompt}`" if facts.instance_prompt else ""))  # fmt: skip
    if facts.num_class_images:
        data.append(f"- {facts.num_class_images} class images (prior preservation)"
                    + (f", prompt `{facts.class_prompt}`" if facts.class_prompt else ""))  # fmt: skip
    if facts.resolution:
        sides = facts.resolution if isinstance(facts.resolution, (list, tuple)) else [facts.resolution]
        data.append(f"- resolution {', '.join(str(side) for side in sides)} px")
    lines += data or ["- not recorded"]
    lines += ["", "## Method and settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | `{_value(v)}` |" for k, v in facts.settings.items()]
    lines += ["", "## Final metrics", ""]
    if facts.metrics:
        lines += ["| metric | value | what it is |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {what} |" for name, value, what in facts.metrics]
    else:
        lines.append("No monitor measured this run (add `CorruptionStageMonitor` or `FIDMonitor` to its callbacks).")
    if facts.verdict:
        lines += ["", f"Corruption-stage monitor: {facts.verdict}."]
    lines += ["", "## Samples", ""]
    if facts.scheduler:
        line = f"The export samples with `{facts.scheduler}`"
        if facts.base_scheduler and facts.base_scheduler != facts.scheduler:
            line += (f", not the base folder's `{facts.base_scheduler}` (a training scheduler: lightning-ft samples "
                     "such models with DDIM; set `model.sample_scheduler` to choose)")  # fmt: skip
        lines += [line + ".", ""]
    if facts.widget:
        lines += ["| prompt | sample |", "|---|---|"]
        lines += [f"| {prompt} | ![{prompt}]({path}) |" for prompt, path in facts.widget]
        if facts.widget_note:
            lines += ["", facts.widget_note]
    else:
        lines.append(facts.widget_note or "No sample images were written.")
    lines += ["", "## Use", "", "```python", "from diffusers import DiffusionPipeline", ""]
    if facts.lora_only and facts.lora.get("format") == "peft":
        # A PEFT adapter folder (LoHa, LoKr, OFT; DiT and PixArt LoRA): diffusers' load_lora_weights cannot read it.
        denoiser = facts.lora.get("denoiser", "transformer")
        lines += ["from lightning_ft.core.trainable import load_peft_lora", "",
                  f"pipe = DiffusionPipeline.from_pretrained({(hub_id or 'BASE_MODEL')!r})",
                  f'load_peft_lora(pipe.{denoiser}, "THIS_FOLDER")']  # fmt: skip
    elif facts.lora_only:
        weight_name = f", weight_name={facts.lora['file']!r}" if facts.lora.get("format") == "kohya" else ""
        lines += [f"pipe = DiffusionPipeline.from_pretrained({(hub_id or 'BASE_MODEL')!r})",
                  f'pipe.load_lora_weights("REPO_ID_OR_THIS_FOLDER"{weight_name})']  # fmt: skip
    else:
        lines.append('pipe = DiffusionPipeline.from_pretrained("REPO_ID_OR_THIS_FOLDER")')
    if facts.usage:
        lines.append(facts.usage)
    lines += ["```", "", "## Upload", "", "```python", "from huggingface_hub import upload_folder", "",
              'upload_folder(repo_id="your-name/your-model", folder_path="path/to/this/folder")', "```", "",
              "(`huggingface-cli login` first; `create_repo(repo_id, exist_ok=True)` makes the repository.)", "",
              "## Base model and license", "", origin, ""]  # fmt: skip
    return "\n".join(lines)


def lora_format_line(record: dict) -> str:
    """The card's line on the layout of a LoRA export's file (its ``lora`` record)."""
    fmt = record["format"]
    if fmt == "kohya":
        return (
            f"LoRA format: `kohya` (`{record.get('file')}`), the single-file layout that ComfyUI (`models/loras`, "
            "LoraLoader node) and AUTOMATIC1111 / Forge (`models/Lora`) load; diffusers reads it too (below)."
        )
    if fmt == "diffusers":
        return "LoRA format: `diffusers`, read by the pipeline's `load_lora_weights`."
    return f"LoRA format: `{fmt}`" + (f"; load it with {record['loader']}" if record.get("loader") else "") + "."


def build_model_card(facts: CardFacts) -> ModelCard:
    data, origin = card_metadata(facts)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_text(facts, origin)}")


def write_model_card(folder: str | Path, facts: CardFacts) -> Path:
    """Write ``README.md`` into the export ``folder`` (atomically) and return its path."""
    from lightning_ft.report.files import write_atomic

    return write_atomic(Path(folder) / "README.md", str(build_model_card(facts)))


# ------------------------------------------------------------------------------------------- from a fit
def settings_of(hparams: dict) -> dict:
    """The method's hyperparameters for the card: everything set (not None), component configs left out, and the
    LoRA settings only when LoRA is trained."""
    lora = hparams.get("trainable") == "lora"
    return {k: v for k, v in dict(hparams).items()
            if k not in NOT_SETTINGS and v is not None and (lora or not k.startswith("lora_"))}  # fmt: skip


def monitor_metrics(trainer) -> tuple[list[tuple[str, str, str]], str | None]:
    """Final values of the run's monitors (every callback with ``card_metrics()``: the corruption stage, FID/KID) and
    the loss; the stage summary line (a monitor's ``verdict()``)."""
    metrics, verdict = [], None
    for callback in trainer.callbacks:
        if hasattr(callback, "card_metrics"):
            metrics += callback.card_metrics()
        if verdict is None and hasattr(callback, "verdict"):
            verdict = callback.verdict()
    loss = trainer.callback_metrics.get("train/loss")
    if loss is not None:
        metrics.append(("train/loss", f"{float(loss):.4f}", "the last logged training loss"))
    return metrics, verdict


def widget_conditions(trainer, pl_module, limit: int = 4):
    """What the card's samples are asked with (``SampleInputs``): the sample-grid logger's rows (a callback with
    ``grid_inputs``), else the data's distinct instance prompts or labels; None when the data has none."""
    for callback in trainer.callbacks:
        if hasattr(callback, "grid_inputs"):
            inputs = callback.grid_inputs(pl_module)
            if inputs.conditional:
                return inputs.distinct()[:limit]
    if getattr(pl_module.family, "needs_source", False):
        return None  # an editing model's samples need source images: only the grid's rows (validation images) have them
    dataset = getattr(trainer.datamodule, "dataset", None)
    prompts = list(dict.fromkeys(getattr(dataset, "prompts", None) or [])) or None
    labels = list(dict.fromkeys(getattr(dataset, "labels", None) or [])) or None
    try:
        return pl_module.family.sample_inputs(prompts, labels, 1).distinct()[:limit]
    except ValueError:  # the model is asked with something the data does not give: no samples
        return None


def write_widget_images(pl_module, inputs, folder: Path, seed: int = 0) -> list[tuple[str, str]]:
    """One sample per input of ``inputs`` (a ``SampleInputs``; seed ``seed``) as ``images/sample_<i>.png``; images
    under 256 px are enlarged by a whole factor (nearest) so the Hub shows them at a readable size. Returns (text,
    relative path) pairs."""
    from PIL import Image

    images = pl_module.generate(**inputs.generate_kwargs(), seeds=[seed] * len(inputs))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i, (text, image) in enumerate(zip(inputs.texts(), images)):
        array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")
        picture = Image.fromarray(array)
        factor = max(1, 256 // max(picture.size))
        if factor > 1:
            picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
        name = f"images/sample_{i}.png"
        picture.save(folder / name)
        out.append((text, name))
    return out


def _declared(folder: Path) -> dict:
    """The export's ``lightning_ft.json`` ({} when it has none)."""
    import json

    file = Path(folder) / "lightning_ft.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def facts_from_fit(trainer, pl_module, folder: Path, lora_only: bool, samples: bool = True) -> CardFacts:
    """Everything the card states, from the finished fit (and sample images written into ``folder``)."""
    import json

    hparams = dict(pl_module.hparams)
    data = dict(getattr(trainer.datamodule, "hparams", {}) or {}) if trainer.datamodule is not None else {}
    dataset = getattr(trainer.datamodule, "dataset", None)
    index = folder / "model_index.json"
    pipeline_class = json.loads(index.read_text()).get("_class_name") if index.exists() else None
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()).get("_class_name") if scheduler_file.exists() else None
    base_file = Path(str(hparams.get("pretrained") or "")) / "scheduler" / "scheduler_config.json"
    base_scheduler = json.loads(base_file.read_text()).get("_class_name") if base_file.is_file() else None
    metrics, verdict = monitor_metrics(trainer)
    facts = CardFacts(
        method=type(pl_module).__name__,
        method_path=f"{type(pl_module).__module__}.{type(pl_module).__name__}",
        settings=settings_of(hparams),
        pretrained=hparams.get("pretrained"),
        task=pl_module.family.task,
        hub_task=pl_module.family.hub_task,
        pipeline_class=pipeline_class,
        scheduler=scheduler,
        base_scheduler=base_scheduler,
        lora_only=lora_only,
        lora=_declared(folder).get("lora") or {},
        steps=trainer.global_step,
        instance_prompt=data.get("instance_prompt"),
        class_prompt=data.get("class_prompt"),
        num_instance_images=len(dataset.images) if dataset is not None and dataset.images is not None else None,
        num_class_images=len(dataset.class_images) if dataset is not None else data.get("num_class_images"),
        resolution=data.get("resolution"),
        metrics=metrics,
        verdict=verdict,
        sample_settings={
            "num_inference_steps": hparams.get("sample_steps"),
            "guidance_scale": hparams.get("guidance_scale"),
        },  # fmt: skip
    )
    call = ", ".join(f"{k}={v!r}" for k, v in facts.sample_settings.items() if v is not None)
    example = facts.instance_prompt or next(iter(getattr(dataset, "prompts", None) or []), None) or "a prompt"
    facts.usage = pl_module.family.usage_example(example, call)
    if samples:
        inputs = widget_conditions(trainer, pl_module)
        if inputs is not None and len(inputs):
            facts.widget = write_widget_images(pl_module, inputs, folder)
            side = pl_module.native_resolution() if hasattr(pl_module, "native_resolution") else None
            enlarged = f"; {side} px images, enlarged for display (nearest)" if side and side < 256 else ""
            settings = facts.sample_settings
            facts.widget_note = (f"Seed 0, {settings['num_inference_steps']} sampling steps, guidance "
                                 f"{settings['guidance_scale']}{enlarged}.")  # fmt: skip
    else:
        facts.widget_note = "No sample images: sampling at export was skipped (sharded weights)."
    return facts
