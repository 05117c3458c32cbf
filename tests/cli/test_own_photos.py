"""The README's own-photos path end to end: DreamBooth on a real model folder with a folder of photos, through

    python -m lightning_ft.run fit --config experiments/dreambooth.yaml --config configs/model/stable_diffusion.yaml
        --config configs/data/my_subject.yaml --data.instance_dir PATH

with a tiny random Stable Diffusion folder (saved with ``save_pretrained``, its metric backbones declared so the
monitors load offline) in place of the hub's, a small resolution and few class images. What the run reads, prints,
reports and exports must be the user's photos: nothing of the embedded world is rendered, and no level of the
corruption monitor is measured on it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, tiny_backbones, tiny_components
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard
from PIL import Image

from lightning_ft.callbacks import CorruptionStageMonitor
from lightning_ft.callbacks.corruption_monitor import unit_pixels
from lightning_ft.core import DiffusionBase
from lightning_ft.data.folder import list_images, load_image
from lightning_ft.metrics import features, subject_fidelity
from lightning_ft.report.run_folder import read_run
from lightning_ft.run import main

PHOTOS = 4
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"  # configs/data/my_subject.yaml's


def _tiny_sd_folder(path):
    """A random tiny Stable Diffusion pipeline folder whose tokenizer knows my_subject.yaml's words (a real SD's
    tokenizer knows every word; the tiny one is word-level) and whose lightning_ft.json declares its backbones."""
    components = copy.deepcopy(tiny_components("tiny_t2i"))
    words = components["tokenizer"]["words"]
    components["tokenizer"]["words"] = sorted({*words, "photo", "of", "dog"})
    components["text_encoder"]["config"]["vocab_size"] += len(components["tokenizer"]["words"]) - len(words)
    torch.manual_seed(0)
    DiffusionBase(components=components, backbones=tiny_backbones(), sample_steps=2).save_pretrained(path)
    return path


def _photos(folder):
    """Photo-like pictures, nothing like the embedded renders: smooth colour gradients with a dark blob, in sizes
    that are neither square nor the model's (so they are resized and centre-cropped), as JPEG."""
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(PHOTOS):
        h, w = 48 + 4 * i, 40
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        colours = rng.uniform(40, 220, size=(2, 3))
        image = colours[0] * (1 - y[..., None]) + colours[1] * y[..., None]
        blob = (y - rng.uniform(0.3, 0.6)) ** 2 + (x - rng.uniform(0.3, 0.6)) ** 2 < 0.04
        image[blob] *= 0.3
        Image.fromarray(image.round().astype(np.uint8)).save(folder / f"IMG_{1000 + i}.jpg", quality=92)
    return folder


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_photos")
    cache = root / "cache"  # this run's own cache: the embedded world must not appear in it
    tiny = _tiny_sd_folder(root / "tiny-sd")
    photos = _photos(root / "my_photos")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(cache))
    monkeypatch.chdir(root)  # the experiment's relative runs/ folder lands here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = main([
            "fit", "--config", str(REPO / "experiments/dreambooth.yaml"),
            "--config", str(REPO / "configs/model/stable_diffusion.yaml"),
            "--config", str(REPO / "configs/data/my_subject.yaml"), "--data.instance_dir", str(photos),
            # Test-sized: the tiny folder for the hub id, its 32 px, 2 class images, 2 steps, 2 sampler steps.
            "--model.pretrained", str(tiny), "--data.resolution", "32", "--data.num_class_images", "2",
            "--model.sample_steps", "2", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
        ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
    return root, cache, photos, cli


def _monitor(cli) -> CorruptionStageMonitor:
    return next(c for c in cli.trainer.callbacks if isinstance(c, CorruptionStageMonitor))


def test_the_run_trains_the_photos_with_the_data_configs_prompts(own_run):
    _, _, photos, cli = own_run
    assert cli.trainer.global_step == 2
    data = cli.datamodule
    assert data.hparams.instance_dir == str(photos) and data.hparams.heldout_dir is None
    assert len(data.dataset.images) == PHOTOS and set(data.dataset.prompts) == {INSTANCE_PROMPT}
    assert data.dataset.class_prompts == [CLASS_PROMPT] * 2


def test_the_monitors_levels_are_read_against_the_photos(own_run):
    _, _, photos, cli = own_run
    monitor, module = _monitor(cli), cli.model
    # Its ceiling: the photos' own round trips, said so (no held-out folder, none of the embedded world's).
    assert monitor.ceiling_source == f"{PHOTOS} autoencoder round trips of data.instance_dir"
    images = [load_image(f) for f in list_images(photos, "photos")]
    size = module.native_resolution()
    reference = features(unit_pixels(images, size), monitor.backbone)
    copies = features(module.round_trip(unit_pixels(images, size)), monitor.backbone)
    assert monitor.levels["ceiling"] == pytest.approx(subject_fidelity(copies, reference), abs=1e-5)
    assert torch.equal(monitor.reference(size)[0], reference)  # every point is scored against the photos
    assert np.isfinite(monitor.levels["class_prior"])  # measured on the class prompt of my_subject.yaml


def test_nothing_of_the_embedded_world_is_rendered(own_run):
    _, cache, _, cli = own_run
    written = [p.relative_to(cache).as_posix() for p in cache.rglob("*")]
    assert written, "the class images are cached there"
    assert not [p for p in written if "embedded" in p or "subject-v" in p or "domain-v" in p], written
    config = yaml.safe_load(next((cache.parent / "runs").rglob("config.yaml")).read_text())
    assert "embedded" not in yaml.safe_dump(config["data"]) + yaml.safe_dump(config["trainer"]["callbacks"])


def test_the_report_and_the_model_card_name_the_users_data(own_run):
    root, _, photos, cli = own_run
    run_dir = next((root / "runs").rglob("report.html")).parent
    files, why = read_run(run_dir).instance_images()
    assert why is None and files == list_images(photos, "photos")  # the report shows the user's photos
    card = ModelCard.load(run_dir / "export" / "README.md")
    assert card.data.instance_prompt == INSTANCE_PROMPT
    assert f"- {PHOTOS} instance images, prompt `{INSTANCE_PROMPT}`" in card.text
    assert f"- 2 class images (prior preservation), prompt `{CLASS_PROMPT}`" in card.text
    assert "- resolution 32 px" in card.text
    # The grid (and so the card's samples) shows the data's prompts: the instance prompt, then the class prompt.
    assert [w["text"] for w in card.data.widget] == [INSTANCE_PROMPT, CLASS_PROMPT]
    rows = yaml.safe_load((run_dir / "samples" / "rows.json").read_text())
    assert rows["rows"] == [INSTANCE_PROMPT, CLASS_PROMPT]


def test_the_export_loads_and_samples_in_plain_diffusers(own_run):
    root, _, _, _ = own_run
    export = next((root / "runs").rglob("export/model_index.json")).parent
    pipe = DiffusionPipeline.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(INSTANCE_PROMPT, num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
