"""The shipped editing configs run as their headers say: ``configs/model/flux_kontext.yaml`` (its hub id replaced by a
tiny random Kontext folder, the only change) with ``configs/data/my_edit_pairs.yaml`` and a folder of targets and one
of sources with the same names, through the CLI: the sources reach the model, the grid shows source | edits, and the
export is a Kontext pipeline that samples the module's edits."""

from __future__ import annotations

import numpy as np
import torch
from conftest import REPO, tiny_module
from diffusers import DiffusionPipeline
from PIL import Image

from lightning_ft.run import main


def _pairs(root, count: int = 3):
    """Targets (a dark disc on a colour) and sources (the same colour, no disc), same file names."""
    targets, sources = root / "target", root / "source"
    targets.mkdir(parents=True)
    sources.mkdir()
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:40, 0:40] / 40
    for i in range(count):
        colour = rng.uniform(60, 220, size=3)
        source = np.broadcast_to(colour, (40, 40, 3)).copy()
        target = source.copy()
        target[(y - 0.5) ** 2 + (x - 0.5) ** 2 < 0.06] *= 0.2
        Image.fromarray(source.round().astype(np.uint8)).save(sources / f"pair_{i}.png")
        Image.fromarray(target.round().astype(np.uint8)).save(targets / f"pair_{i}.png")
        (targets / f"pair_{i}.txt").write_text("a black circle")
    return targets, sources


def test_the_shipped_kontext_configs_train_on_pairs_and_export(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tiny = tmp_path / "tiny-kontext"
    tiny_module(model="tiny_flux_kontext", family="flux_kontext").save_pretrained(tiny)
    targets, sources = _pairs(tmp_path / "pairs")
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(REPO / "experiments/dreambooth_lora.yaml"),
                "--config", str(REPO / "configs/model/flux_kontext.yaml"),
                "--config", str(REPO / "configs/data/my_edit_pairs.yaml"),
                "--model.pretrained", str(tiny), "--model.sample_steps", "2", "--model.sample_resolution", "32",
                "--data.instance_dir", str(targets), "--data.source_dir", str(sources), "--data.resolution", "32",
                "--data.sample_prompts", '["a black circle"]', "--data.repeats", "2",
                "--trainer.max_steps", "2", "--trainer.logger", "false",
                f"--trainer.default_root_dir={tmp_path / 'runs'}"])  # fmt: skip
    module, data = cli.model, cli.datamodule
    assert module.family.name == "flux_kontext" and cli.trainer.global_step == 2
    batch = next(iter(data.train_dataloader()))
    assert batch["source_values"].shape == batch["pixel_values"].shape  # each target with its source
    # The grid's first image is the source itself (the first training source: no validation images given).
    source = data.sample_sources(1)
    assert source.shape == (1, 3, 32, 32)
    edits = module.generate(prompts=["a black circle"], seeds=[5], sources=source)
    export = next(tmp_path.rglob("export/model_index.json")).parent
    pipe = DiffusionPipeline.from_pretrained(export)
    assert type(pipe).__name__ == "FluxKontextPipeline"
    inputs = module.family.sample_inputs(["a black circle"]).with_sources(source)
    got = module.family.sample(module, pipe, inputs, [5], module.hparams.sample_steps, module.hparams.guidance_scale)
    torch.testing.assert_close(got, edits, rtol=0, atol=2e-4)
