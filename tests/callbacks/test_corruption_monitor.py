"""CorruptionStageMonitor end to end on the tiny model: curves reach the CSV and the logger, the best checkpoint is
kept, and the history survives a state round trip and a resume."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from conftest import tiny_module, write_images
from lightning.pytorch.loggers import CSVLogger

from lightning_ft.callbacks import CorruptionStageMonitor
from lightning_ft.callbacks.corruption_monitor import BEST_CHECKPOINT, CSV_COLUMNS
from lightning_ft.data import LimitedDataModule
from lightning_ft.metrics import subject_fidelity
from lightning_ft.report.stage_rules import STAGE_CODES

PROMPT = "a sks star"
# The tiny test model declares no backbone (it has no pretrained folder): the embedded identity network scores it.
IDENTITY = "lightning_ft.embedded.backbones:identity"


def _fit(root, data_dir, max_steps, module=None, ckpt_path=None, data_args=None, **monitor_args):
    monitor_args = {"backbone": IDENTITY, "class_prompt": "a star", "seeds": [0, 1], **monitor_args}
    monitor = CorruptionStageMonitor(every_n_steps=2, steps=2, verbose=False, **monitor_args)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=CSVLogger(root, name="run", version=0),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    data = LimitedDataModule(
        str(data_dir), instance_prompt=PROMPT, resolution=32, batch_size=2, repeats=4, **(data_args or {})
    )
    torch.manual_seed(0)
    module = module or tiny_module(lr=1e-3)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, monitor, module


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the tiny model gains nothing from more, and on a shared, loaded core extra threads make
    these runs over ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    data_dir = write_images(root / "subject", 3)
    trainer, monitor, module = _fit(root, data_dir, max_steps=5, keep_best_checkpoint=True)
    return root, data_dir, trainer, monitor, module


def test_curves_reach_the_csv_at_step_0_every_n_steps_and_the_end(run):
    root, _, trainer, monitor, _ = run
    path = root / "run" / "version_0" / "corruption_stage.csv"
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]  # step 0, every 2 steps, and the end
    report = monitor.report
    assert report is not None and report.steps == [0, 2, 4, 5]
    for row, point, stage in zip(rows, monitor.history, report.stages):
        assert float(row["fidelity"]) == pytest.approx(point["fidelity"])
        assert -1.0 <= point["fidelity"] <= 1.0 and point["score"] > 0 and 0 <= point["diversity"] <= 2
        assert point["score"] == pytest.approx(point["hf_energy"] / monitor.reference(32)[1])
        assert row["stage"] == stage and int(row["stage_code"]) == STAGE_CODES[stage]
    # The samples are fixed-seed: re-sampling the final model reproduces the last point.
    _, _, _, _, module = run
    images = module.generate(prompts=[PROMPT, PROMPT], seeds=[0, 1], steps=2)
    assert subject_fidelity(images, monitor.reference(32)[0], monitor.backbone) == pytest.approx(
        monitor.history[-1]["fidelity"], abs=1e-5
    )


def test_logged_metrics_reach_the_csv_logger(run):
    root, _, _, monitor, _ = run
    with (root / "run" / "version_0" / "metrics.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("corruption/fidelity")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]
    for row, point in zip(rows, monitor.history):
        assert float(row["corruption/fidelity"]) == pytest.approx(point["fidelity"])
        for key in ("score", "memorisation", "diversity"):
            assert float(row[f"corruption/{key}"]) == pytest.approx(point[key])
    assert int(float(rows[-1]["corruption/stage"])) == monitor.report.verdict_code
    assert int(float(rows[-1]["corruption/best_step"])) == monitor.report.best_step_before_corruption
    # The last point is also in callback_metrics, where ModelCheckpoint and EarlyStopping look for monitors.
    trainer = run[2]
    assert trainer.callback_metrics["corruption/fidelity"].item() == pytest.approx(monitor.history[-1]["fidelity"])


def test_best_checkpoint_is_the_best_step_and_holds_the_history(run):
    root, _, _, monitor, _ = run
    path = root / "run" / "version_0" / BEST_CHECKPOINT
    assert path.exists() and monitor.best_checkpoint_path == path
    ckpt = torch.load(path, weights_only=False)
    best = monitor.report.best_step_before_corruption
    assert ckpt["global_step"] == best == monitor.saved_step
    state = ckpt["callbacks"][monitor.state_key]
    assert [p["step"] for p in state["history"]] == [s for s in monitor.report.steps if s <= best]


def test_state_dict_round_trip_and_resume_keep_the_history(run, tmp_path):
    _, data_dir, _, monitor, _ = run
    fresh = CorruptionStageMonitor()
    fresh.load_state_dict(monitor.state_dict())
    assert fresh.history == monitor.history and fresh.saved_step == monitor.saved_step
    assert fresh.levels == monitor.levels and fresh.ceiling_source == monitor.ceiling_source
    assert fresh.report.stages == monitor.report.stages
    assert fresh.effective_memorisation_threshold == monitor.effective_memorisation_threshold

    # Resume from the kept checkpoint: the restored points are not re-measured and new ones are added.
    best = monitor.saved_step
    ckpt = run[0] / "run" / "version_0" / BEST_CHECKPOINT
    _, resumed, _ = _fit(tmp_path, data_dir, max_steps=best + 2, ckpt_path=ckpt)
    # After the restored points: every multiple of every_n_steps=2 reached, and the last step.
    new = {s for s in (best + 1, best + 2) if s % 2 == 0} | {best + 2}
    assert [p["step"] for p in resumed.history] == sorted({*[s for s in monitor.report.steps if s <= best], *new})
    restored = [p for p in resumed.history if p["step"] <= best]
    assert restored == [p for p in monitor.history if p["step"] <= best]
    # The levels were measured on the pretrained model at the first start; a resume keeps them, not re-measures.
    assert resumed.levels == monitor.levels


def test_levels_are_measured_logged_and_give_progress(run):
    root, data_dir, _, monitor, module = run
    levels = monitor.levels
    assert set(levels) == {"class_prior", "ceiling", "ceiling_memorisation"}
    # The ceiling: the instance images' own round trips through the model's autoencoder, scored like a sample.
    from lightning_ft.data.folder import list_images, load_image, to_tensor

    images = torch.stack(
        [(to_tensor(load_image(f), 32, True, False, None) + 1) / 2 for f in list_images(data_dir, "x")]
    )
    ref = monitor.reference(32)[0]
    assert levels["ceiling"] == pytest.approx(
        subject_fidelity(module.round_trip(images), ref, monitor.backbone), abs=1e-5
    )
    assert -1 <= levels["class_prior"] <= 1
    for point in monitor.history:
        expected = (point["fidelity"] - levels["class_prior"]) / (levels["ceiling"] - levels["class_prior"])
        assert point["progress"] == pytest.approx(expected)
    with (root / "run" / "version_0" / "corruption_stage.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert all(float(r["ceiling"]) == pytest.approx(levels["ceiling"]) for r in rows)
    with (root / "run" / "version_0" / "metrics.csv").open() as handle:
        logged = [r for r in csv.DictReader(handle) if r.get("corruption/ceiling")]
    assert logged and float(logged[0]["corruption/class_prior"]) == pytest.approx(levels["class_prior"])
    # The memorisation threshold lies between the instances' own nearest-neighbour similarity and the ceiling's.
    assert monitor.effective_memorisation_threshold <= levels["ceiling_memorisation"] + 1e-6
    # No held-out images anywhere: the ceiling is the instance images' round trips, and the line says whose.
    assert monitor.ceiling_source == "3 autoencoder round trips of data.instance_dir"


def _round_trip_fidelity(module, monitor, folder) -> float:
    from lightning_ft.callbacks.corruption_monitor import unit_pixels
    from lightning_ft.data.folder import list_images, load_image

    images = unit_pixels([load_image(f) for f in list_images(folder, "x")], 32)
    return subject_fidelity(module.round_trip(images), monitor.reference(32)[0], monitor.backbone)


def test_the_ceiling_comes_from_the_data_modules_heldout_dir_unless_the_monitor_names_one(tmp_path, caplog):
    """A data config names the subject's held-out images once (data.heldout_dir); the monitor reads them for its
    ceiling and prints whose round trips it measured. Its own heldout_dir wins."""
    data_dir = write_images(tmp_path / "subject", 3)
    heldout = write_images(tmp_path / "heldout", 5, seed=3)
    other = write_images(tmp_path / "other", 2, seed=9)
    with caplog.at_level("INFO"):
        _, monitor, module = _fit(tmp_path / "a", data_dir, max_steps=1, levels=True,
                                  data_args={"heldout_dir": str(heldout)})  # fmt: skip
    assert monitor.ceiling_source == "5 autoencoder round trips of data.heldout_dir"
    assert "(5 autoencoder round trips of data.heldout_dir)" in caplog.text
    assert monitor.levels["ceiling"] == pytest.approx(_round_trip_fidelity(module, monitor, heldout), abs=1e-5)
    monitor.history[-1]["progress"] = 0.5  # whatever the random model scored: the card row's words are checked
    (progress,) = [what for name, _, what in monitor.card_metrics() if name == "progress"]
    assert progress == "0 = the class prior, 1 = the ceiling (5 autoencoder round trips of data.heldout_dir)"

    _, own, module = _fit(tmp_path / "b", data_dir, max_steps=1, heldout_dir=str(other),
                          data_args={"heldout_dir": str(heldout)})  # fmt: skip
    assert own.ceiling_source == "2 autoencoder round trips of CorruptionStageMonitor.heldout_dir"
    assert own.levels["ceiling"] == pytest.approx(_round_trip_fidelity(module, own, other), abs=1e-5)


def test_a_missing_heldout_folder_fails_naming_the_key(tmp_path):
    data_dir = write_images(tmp_path / "subject", 2)
    with pytest.raises(FileNotFoundError, match="data.heldout_dir: folder .*typo.* does not exist"):
        _fit(tmp_path, data_dir, max_steps=1, data_args={"heldout_dir": str(tmp_path / "typo")})


def test_a_memorised_sample_reaches_the_ceiling(tmp_path, monkeypatch):
    """A model that draws exact copies of the instance images (through its own autoencoder) scores the ceiling:
    progress 1, and the stage rules call it memorising."""
    from lightning_ft.data.folder import list_images, load_image, to_tensor

    data_dir = write_images(tmp_path / "subject", 3)
    images = torch.stack(
        [(to_tensor(load_image(f), 32, True, False, None) + 1) / 2 for f in list_images(data_dir, "x")]
    )
    torch.manual_seed(0)  # the random autoencoder's weights, whatever ran before: the ceiling must beat the prior
    module = tiny_module(lr=1e-3)
    copies = module.round_trip(images)

    def generate(prompts=None, seeds=(), **kwargs):
        if prompts and prompts[0] == "a star":  # the class prompt: the prior draws something else
            return torch.rand(len(seeds), 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return copies.repeat(len(seeds) // len(copies) + 1, 1, 1, 1)[: len(seeds)]

    monkeypatch.setattr(module, "generate", generate)
    _, monitor, _ = _fit(tmp_path, data_dir, max_steps=2, module=module, seeds=[0, 1, 2])
    assert monitor.history[-1]["fidelity"] == pytest.approx(monitor.levels["ceiling"], abs=1e-5)
    assert monitor.history[-1]["progress"] == pytest.approx(1.0, abs=1e-4)
    assert monitor.report.verdict == "memorising"
