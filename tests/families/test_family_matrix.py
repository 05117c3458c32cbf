"""Every model family x every method through the CLI: 2 steps of ``fit``, the export, a reload in plain diffusers (or
in the method, for methods whose inserted modules are part of the model), and the same images as the module.

The families are the tiny random models of ``configs/model/tiny_*.yaml`` (built from configs, as diffusers' own tests
build theirs); the methods are the experiment files themselves, with a tiny subject folder and the export as the
only callback. docs/families.md, "Every family with every method", reproduces this table.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from diffusers import DiffusionPipeline

from lightning_ft.callbacks import DiffusersExport
from lightning_ft.core.families import REGISTRY
from lightning_ft.run import main

#: Every family with a tiny config: ``configs/model/tiny_<name>.yaml`` is row ``<name>`` (``tiny_t2i``: ``sd``), plus
#: SD 2.x's v-prediction as a row of its own. A new family's tiny config is its row: this file does not change.
TINY_CONFIGS = sorted((REPO / "configs/model").glob("tiny_*.yaml"))
FAMILIES = {
    ("sd" if c.stem == "tiny_t2i" else c.stem.removeprefix("tiny_")): ["--config", str(c)] for c in TINY_CONFIGS
}
FAMILIES["sd2_v"] = [*FAMILIES["sd"], "--model.prediction_type", "v_prediction"]
METHODS = {
    "dreambooth": "dreambooth.yaml",
    "lora": "dreambooth_lora.yaml",
    "bnn": "dreambooth_bnn.yaml",
    "lora_bnn": "dreambooth_lora_bnn.yaml",
    "diff_tuning": "diff_tuning.yaml",
    "sdft": "sdft.yaml",
    "a3fta": "a3fta.yaml",
    "anl": "anl.yaml",
}


#: Editing families (``needs_source``): their data pairs every image with a source image (``data.source_dir``), their
#: samples are asked with one, and they train without prior preservation (class images have no source).
EDITING = {name for name in FAMILIES if getattr(REGISTRY.get(name), "needs_source", False)}


@pytest.fixture(autouse=True)
def tiny_family(request, monkeypatch):
    """A row runs in its family's ``tiny_context`` if it declares one (e.g. a pipeline's hard-coded sizes shrunk for
    CPU), and is skipped, naming them, when packages the family ``requires`` are not installed. When loading its
    export needs packages that are not installed (``reload_requires``), the row fits, exports and samples, then skips
    at the reload, naming them."""
    callspec = getattr(request.node, "callspec", None)
    family = REGISTRY.get(callspec.params.get("family")) if callspec else None
    missing = [m for m in getattr(family, "requires", ()) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the {family.name} family needs {', '.join(missing)}, which is not installed")
    unloadable = [m for m in getattr(family, "reload_requires", ()) if importlib.util.find_spec(m) is None]
    if unloadable:

        def skip_reload(module, folder):
            pytest.skip(f"fit, export and samples ran; reloading the {family.name} export needs "
                        f"{', '.join(unloadable)}, which is not installed")  # fmt: skip

        monkeypatch.setitem(globals(), "_reload", skip_reload)
    with getattr(family, "tiny_context", contextlib.nullcontext)():
        yield


def _has_resnets(family: str) -> bool:
    """Whether the family's tiny denoiser has diffusers ``ResnetBlock2D`` modules, where ANL inserts its modules (a
    transformer has none: ANL refuses it by name)."""
    import diffusers
    from diffusers.models.resnet import ResnetBlock2D

    spec = yaml.safe_load(Path(FAMILIES[family][1]).read_text())["model"]["init_args"]["components"]["denoiser"]
    with torch.device("meta"):
        denoiser = getattr(diffusers, spec["class"]).from_config(spec["config"])
    return any(isinstance(m, ResnetBlock2D) for m in denoiser.modules())


def not_applicable(family: str, method: str) -> str | None:
    """The error that says why (family, method) cannot apply, None when it applies."""
    if method == "anl" and not _has_resnets(family):
        return "no diffusers ResnetBlock2D"
    if method == "diff_tuning" and family in EDITING:
        return "Diff-Tuning.*editing model.*does not apply"
    return None


#: Methods whose export holds inserted modules: reloaded through the method, not plain diffusers.
WITH_MODULES = {"a3fta", "anl"}
PROMPTS = ["a sks star on a gray background", "a red circle"]


def _sources(tmp_path, subject_dir) -> Path:
    """A source folder for an editing family: per subject image, one of the same name (a flat colour per image)."""
    from PIL import Image

    folder = tmp_path / "sources"
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(sorted(subject_dir.glob("*.png"))):
        Image.new("RGB", Image.open(image).size, (40 + 60 * (i % 4), 128, 200 - 50 * (i % 3))).save(folder / image.name)
    return folder


#: What an editing family's samples are edits of in the comparison of module and reload.
SAMPLE_SOURCES = torch.stack([torch.full((3, 32, 32), 0.2), torch.linspace(0, 1, 32).expand(3, 32, 32)])


def _overrides(tmp_path, subject_dir, family: str, method: str) -> str:
    experiment = yaml.safe_load((REPO / "experiments" / METHODS[method]).read_text())
    data = {"instance_dir": str(subject_dir), "captions_file": None, "instance_prompt": PROMPTS[0],
            "batch_size": 2, "repeats": 2}  # fmt: skip
    if family in EDITING:  # paired data; no class images (they have no source)
        data.update(source_dir=str(_sources(tmp_path, subject_dir)), num_class_images=0)
    elif experiment["data"]["init_args"].get("num_class_images"):
        data.update(num_class_images=2, class_prompt="a star on a gray background")
    if family == "dit":
        data.update(class_label=3)
        if "num_class_images" in data:
            data.update(class_image_label=5)
    model = {"sample_steps": 2}
    if "memory_size" in experiment["model"]["init_args"]:
        model.update(memory_size=4, memory_sample_steps=2)
    export = {
        "class_path": "lightning_ft.callbacks.DiffusersExport",
        "init_args": {"dirpath": str(tmp_path / "export")},
    }
    config = {
        "trainer": {"max_steps": 2, "logger": False, "default_root_dir": str(tmp_path), "callbacks": [export],
                    "enable_checkpointing": False},
        "model": {"init_args": model},
        "data": {"init_args": data},
    }  # fmt: skip
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _reload(module, folder):
    """The export as its users load it: plain diffusers (a pipeline), or the method class for inserted modules."""
    if type(module).export_folder is not None:
        h = module.hparams
        return type(module)(pretrained=str(folder), sample_steps=2, guidance_scale=h.guidance_scale,
                            sample_resolution=h.sample_resolution)  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_method_fits_exports_and_reloads_to_the_same_images(family, method, tmp_path, subject_dir, monkeypatch):
    args = ["fit", "--config", str(REPO / "experiments" / METHODS[method]), *FAMILIES[family],
            "--config", _overrides(tmp_path, subject_dir, family, method)]  # fmt: skip
    refusal = not_applicable(family, method)
    if refusal:
        with pytest.raises(ValueError, match=refusal):
            main(args)
        return
    # The weights at the start of fit (after setup: class images and memory banks are sampled by then).
    start = {}
    fit_start = DiffusersExport.on_fit_start

    def record_start(self, trainer, pl_module):
        fit_start(self, trainer, pl_module)
        start.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    monkeypatch.setattr(DiffusersExport, "on_fit_start", record_start)
    torch.manual_seed(0)
    cli = main(args)
    module = cli.model
    assert cli.trainer.global_step == 2
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), start[n])}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable  # the method trained, and only what it trains
    if family == "sd2_v":
        assert module.noise_process.prediction_type == "v_prediction"
    inputs = module.family.sample_inputs(PROMPTS, [3, 7], 2)
    if family in EDITING:
        inputs = module.family.with_sources(inputs, SAMPLE_SOURCES)
    seeds = [11, 12]
    guidance = 2.0
    expected = module.generate(**inputs.generate_kwargs(), seeds=seeds, guidance_scale=guidance)
    reloaded = _reload(module, tmp_path / "export")
    if hasattr(reloaded, "generate"):
        got = reloaded.generate(**inputs.generate_kwargs(), seeds=seeds, guidance_scale=guidance)
    elif inputs.labels is not None:
        # Plain DiTPipeline, guidance included (its null class 1000 is the model's null row in the export).
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        labels = list(inputs.labels)
        out = reloaded(labels, guidance_scale=guidance, num_inference_steps=2, generator=generators, output_type="np")
        got = torch.from_numpy(out.images).permute(0, 3, 1, 2).float()
        assert type(reloaded).__name__ == "DiTPipeline"
    else:
        got = module.family.sample(module, reloaded, inputs, seeds, 2, guidance)
        assert type(reloaded).__name__ == module.family.pipeline_class
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)
    assert not torch.allclose(expected[0], expected[1])


#: The ControlNet column: the experiment (plain ControlNet training, or Diff-Tuning on it) with trainable=controlnet.
CONTROLNET_METHODS = {"controlnet": "dreambooth", "controlnet_diff_tuning": "diff_tuning"}
#: Families with ControlNet training (their pipelines' ControlNet variants); the others are refused naming them.
WITH_CONTROLNET = {"sd", "sd2_v", "sdxl"}


@pytest.mark.parametrize("method", list(CONTROLNET_METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_controlnet_fits_exports_and_reloads_to_the_same_images(family, method, tmp_path, subject_dir):
    from PIL import Image

    controls = tmp_path / "controls"
    controls.mkdir()
    for i, image in enumerate(sorted(subject_dir.glob("*.png"))):
        Image.new("RGB", Image.open(image).size, (255 * (i % 2), 128, 0)).save(controls / image.name)
    base = METHODS[CONTROLNET_METHODS[method]]
    args = ["fit", "--config", str(REPO / "experiments" / base), *FAMILIES[family],
            "--config", _overrides(tmp_path, subject_dir, family, CONTROLNET_METHODS[method]),
            "--model.trainable", "controlnet", "--data.num_class_images", "0", "--data.control_dir", str(controls),
            "--data.class_prompt", "null"]  # fmt: skip
    if family not in WITH_CONTROLNET:
        with pytest.raises(ValueError, match="has no ControlNet training in lightning-ft"):
            main(args)
        return
    torch.manual_seed(0)
    module = main(args).model
    assert module.controlnet is not None and not any(p.requires_grad for p in module.denoiser.parameters())
    control = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32) * 0.7])
    expected = module.generate(prompts=PROMPTS, seeds=[11, 12], guidance_scale=2.0, controls=control)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "export")
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded).__name__ == module.family.controlnet_pipeline
    inputs = module.family.sample_inputs(PROMPTS, None, 2).with_controls(control)
    got = module.family.sample(module, reloaded, inputs, [11, 12], 2, 2.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)
