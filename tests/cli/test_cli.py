"""The CLI: overrides reach the module, configs merge (last wins), interpolation, saved config, every experiment."""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ft.cli import StepsProgressBar
from lightning_ft.core import DiffusionBase
from lightning_ft.embedded import asset_path
from lightning_ft.methods import DreamBooth
from lightning_ft.run import main

TINY = str(REPO / "configs/model/tiny_t2i.yaml")
EXPERIMENTS = sorted(REPO.glob("experiments/*.yaml")) + sorted(REPO.glob("experiments/dit/*.yaml"))
VAE = asset_path("shapes-t2i") / "vae"


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _tiny_data(tmp_path, subject_dir) -> str:
    """A data config of a tiny subject folder (the experiments hold no data: a data config gives it)."""
    return _write(
        tmp_path / "data.yaml",
        f"data:\n  init_args:\n    instance_dir: {subject_dir}\n    instance_prompt: a sks star on a gray background\n"
        "    class_prompt: a star on a gray background\n    num_class_images: 2\n    batch_size: 1\n",
    )


def _tiny(tmp_path, subject_dir, experiment: str = "dreambooth.yaml") -> list[str]:
    """Config arguments: a real experiment file, with the tiny model and a tiny subject folder on top."""
    return ["--config", str(REPO / "experiments" / experiment), "--config", TINY,
            "--config", _tiny_data(tmp_path, subject_dir)]  # fmt: skip


def test_overrides_reach_the_module_and_last_config_wins(tmp_path, subject_dir):
    later = _write(tmp_path / "later.yaml", "trainer:\n  max_steps: 7\nmodel:\n  init_args:\n    lr: 0.125\n")
    cli = main(
        [
            *_tiny(tmp_path, subject_dir, "dreambooth_lora.yaml"),
            "--config",
            later,
            "--model.lora_rank",
            "8",
            "--data.batch_size",
            "3",
        ],
        run=False,
    )
    assert cli.model.hparams.lora_rank == 8 and cli.model.hparams.trainable == "lora"
    assert cli.model.hparams.lr == 0.125  # from the later config file
    assert cli.trainer.max_steps == 7
    assert cli.datamodule.hparams.batch_size == 3
    lora_params = [n for n, p in cli.model.named_parameters() if p.requires_grad]
    assert lora_params and all("lora" in n for n in lora_params)


def test_omegaconf_interpolation_in_yaml(tmp_path, subject_dir):
    interp = _write(
        tmp_path / "interp.yaml",
        "model:\n  init_args:\n    lr: 0.003\n    warmup_steps: 11\n"
        "trainer:\n  max_steps: ${model.init_args.warmup_steps}\n",
    )
    cli = main(
        [
            *_tiny(tmp_path, subject_dir),
            "--config",
            interp,
        ],
        run=False,
    )
    assert cli.trainer.max_steps == 11


def test_print_config_shows_the_resolved_config(tmp_path, subject_dir):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_ft.run",
            "fit",
            *_tiny(tmp_path, subject_dir, "dreambooth_lora.yaml"),
            "--model.lora_rank",
            "8",
            "--print_config",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    config = yaml.safe_load(out.stdout)
    assert config["model"]["init_args"]["lora_rank"] == 8
    assert config["data"]["init_args"]["instance_dir"] == str(subject_dir)


def test_fit_saves_the_resolved_config_beside_the_logs(tmp_path, subject_dir):
    root = tmp_path / "run"
    main(
        [
            "fit",
            *_tiny(tmp_path, subject_dir),
            "--trainer.max_steps",
            "1",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger.init_args.save_dir",
            str(root),
        ],
    )
    saved = list(root.rglob("config.yaml"))
    assert saved, "config.yaml written beside the logs"
    config = yaml.safe_load(saved[0].read_text())
    assert config["trainer"]["max_steps"] == 1
    assert (root / "lightning_logs").exists() or list(root.rglob("metrics.csv"))
    assert list(root.rglob("model_index.json")), "the export callback wrote a diffusers folder"


def test_unknown_key_and_wrong_type_are_rejected_with_the_key_named(tmp_path, subject_dir):
    args = ["fit", *_tiny(tmp_path, subject_dir)]
    for extra, key in ((["--model.learning_rate", "1"], "learning_rate"), (["--model.lr", "fast"], "lr")):
        result = subprocess.run(
            [sys.executable, "-m", "lightning_ft.run", *args, *extra, "--print_config"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert result.returncode != 0 and f"{key}" in result.stdout + result.stderr


def _run_command(experiment: Path) -> list[str]:
    """The arguments of the experiment header's ``# To run:`` command (continuation lines joined), after ``fit``."""
    header = "".join(line[1:] for line in experiment.read_text().splitlines() if line.startswith("#"))
    match = re.search(r"To run: python -m lightning_ft\.run fit ((?:[^\\()\[]|\\ +)+)", header)
    assert match, f"{experiment.name}: no '# To run: python -m lightning_ft.run fit ...' line"
    return shlex.split(match.group(1).replace("\\", " "))


def _data_config(experiment: Path) -> str | None:
    """The data config the experiment's ``To run`` command names (None for the pretraining recipes, whose data
    module is the shapes world itself)."""
    command = _run_command(experiment)
    configs = [command[i + 1] for i, a in enumerate(command[:-1]) if a == "--config"]
    assert configs[0] == str(experiment.relative_to(REPO)), f"{experiment.name}: its To run names {configs[0]}"
    data = [c for c in configs[1:] if c.startswith("configs/data/")]
    return data[0] if data else None


def test_experiments_hold_no_embedded_data_and_name_their_data_config():
    """The embedded world's folders, prompts and held-out images come only through configs/data/embedded_*.yaml: an
    experiment file that used ${embedded:...} would render its target even under another data config."""
    for experiment in EXPERIMENTS:
        text = experiment.read_text()
        assert "${embedded:" not in text, experiment.name
        config = yaml.safe_load(text)
        if config["data"]["class_path"] == "lightning_ft.data.LimitedDataModule":
            data = config["data"]["init_args"]
            assert not {"instance_dir", "instance_prompt", "class_prompt", "captions_file", "heldout_dir"} & set(data)
            subject = bool(data.get("num_class_images"))  # DreamBooth's prior preservation: a subject
            expected = "configs/data/embedded_subject.yaml" if subject else "configs/data/embedded_domain.yaml"
            if config["model"]["init_args"].get("trainable") == "controlnet":  # control images paired with images
                expected = "configs/data/embedded_control.yaml"
            assert _data_config(experiment) == expected, experiment.name
            for callback in config["trainer"].get("callbacks", []):
                args = callback.get("init_args") or {}
                assert not {"heldout_dir", "reference_dir", "labels"} & set(args), (experiment.name, callback)
                assert args.get("prompts") in (None, []), (experiment.name, callback)  # [] : ANL's own inputs
    for data_config in ("embedded_subject", "embedded_domain", "embedded_control"):
        assert "${embedded:" in (REPO / "configs/data" / f"{data_config}.yaml").read_text()


def test_an_experiment_without_a_data_config_stops_before_rendering_anything(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(cache))
    result = subprocess.run(
        [sys.executable, "-m", "lightning_ft.run", "fit", "--config", str(REPO / "experiments/dreambooth_bnn.yaml"),
         "--trainer.default_root_dir", str(tmp_path / "runs")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0 and "instance_dir" in result.stderr, result.stderr[-2000:]
    assert not (cache / "embedded").exists() and not (tmp_path / "runs").exists()


def test_an_experiment_without_a_data_config_names_the_data_configs(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path / "cache"))
    with pytest.raises((ValueError, SystemExit)) as error:
        main(["--config", str(REPO / "experiments/dreambooth_bnn.yaml")], run=False)  # run=False: no subcommand
    assert "give a data config: configs/data/embedded_subject.yaml" in str(error.value)


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_every_experiment_runs_a_few_steps(experiment, tmp_path, monkeypatch):
    """Each experiment as its header's ``To run`` command gives it (with its data config), for two steps."""
    monkeypatch.chdir(tmp_path)  # relative output paths of the experiment land in the temporary folder
    # The pretraining recipe chains its steps through runs/; here steps 2 and 3 read the shipped model instead
    # (only those entries: the recipes' export dirs must stay inside the temporary folder).
    text = experiment.read_text()
    text = text.replace("vae: {pretrained: runs/pretrain_shapes_vae/export}", f"vae: {{pretrained: {VAE}}}")
    text = text.replace("pretrained: runs/pretrain_shapes/export", f"pretrained: {VAE.parent}")  # step 3 reads step 2
    text = text.replace("pretrained: runs/pretrain_shapes_vae/export  #", f"pretrained: {VAE}  #")  # step 4 reads 1
    text = text.replace("pretrained: runs/pretrain_shapes_continue/export", f"pretrained: {VAE.parent}")  # 5 reads 3
    config_file = _write(tmp_path / experiment.name, text)
    config = yaml.safe_load(text)
    overrides = ["--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
                 "--data.batch_size", "2"]  # fmt: skip
    if config["data"]["init_args"].get("num_class_images"):
        overrides += ["--data.num_class_images", "2"]
    module, _, name = config["model"]["class_path"].rpartition(".")
    model_class = getattr(importlib.import_module(module), name)
    if issubclass(model_class, DiffusionBase):
        overrides += ["--model.sample_steps", "2"]
    if "memory_size" in inspect.signature(model_class).parameters:
        overrides += ["--model.memory_size", "4", "--model.memory_sample_steps", "2"]
    assets = asset_path("shapes-t2i").parent
    shipped = {p: p.stat().st_mtime_ns for p in assets.rglob("*") if p.is_file()}
    data_config = _data_config(experiment)
    data = ["--config", str(REPO / data_config)] if data_config else []
    cli = main(["fit", "--config", config_file, *data, *overrides])
    assert cli.trainer.global_step == 2
    assert shipped == {p: p.stat().st_mtime_ns for p in assets.rglob("*") if p.is_file()}


def test_validate_test_and_predict_subcommands(tmp_path, subject_dir):
    args = [*_tiny(tmp_path, subject_dir), "--trainer.logger", "false"]
    first = main(["validate", *args])
    second = main(["test", *args])
    val = first.trainer.callback_metrics["val/loss"]
    assert torch.isfinite(val) and torch.equal(val, main(["validate", *args]).trainer.callback_metrics["val/loss"])
    assert torch.isfinite(second.trainer.callback_metrics["test/loss"])
    cli = main(
        ["predict", *args, "--data.predict_prompts", "[a red star, a sks star]", "--data.predict_seeds", "[0, 1]"]
    )
    images = torch.cat(cli.trainer.predict_loop.predictions)
    assert images.shape == (4, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_memory_saving_fragment_switches_the_options_on(tmp_path, subject_dir):
    fragment = str(REPO / "configs/model/memory_saving.yaml")
    cli = main([*_tiny(tmp_path, subject_dir), "--config", fragment], run=False)
    assert cli.model.denoiser.is_gradient_checkpointing and cli.model.latent_cache is not None
    plain = main(_tiny(tmp_path, subject_dir), run=False)
    assert not plain.model.denoiser.is_gradient_checkpointing and plain.model.latent_cache is None


def _fit_args(tmp_path, subject_dir, root, *extra, experiment: str = "dreambooth.yaml") -> list[str]:
    """A short fit that writes its logs (CSV) and a last.ckpt under ``root``."""
    callbacks = "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}]"
    return ["fit", *_tiny(tmp_path, subject_dir, experiment), "--model.sample_steps", "2", "--trainer.callbacks",
            callbacks, "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip


def _versions(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "lightning_logs").iterdir())


def test_resume_keeps_the_command_line_and_logs_what_changed(tmp_path, subject_dir, capsys):
    root = tmp_path / "runs"
    main(_fit_args(tmp_path, subject_dir, root, "--trainer.max_steps", "2"))
    capsys.readouterr()
    cli = main(_fit_args(tmp_path, subject_dir, root, "--trainer.max_steps", "3", "--ckpt_path", "last",
                         "--model.lr", "1e-3", "--model.sample_steps", "3"))  # fmt: skip
    out = capsys.readouterr().out
    assert f"ckpt_path=last resumes {root / 'lightning_logs/version_0/checkpoints/last.ckpt'}" in out
    for change in ("model.lr: 0.0001 -> 0.001", "model.sample_steps: 2 -> 3", "trainer.max_steps: 2 -> 3"):
        assert change in out
    assert cli.trainer.global_step == 3 and cli.model.hparams.lr == 1e-3
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 1e-3  # applied over the restored optimizer state
    config = yaml.safe_load((root / "lightning_logs/version_1/config.yaml").read_text())
    assert config["model"]["init_args"]["lr"] == 1e-3 and config["model"]["init_args"]["sample_steps"] == 3


def test_resume_refuses_another_method_trainable_set_or_lora_rank(tmp_path, subject_dir):
    root = tmp_path / "runs"
    main(_fit_args(tmp_path, subject_dir, root, "--trainer.max_steps", "1", experiment="dreambooth_lora.yaml"))
    last = str(root / "lightning_logs/version_0/checkpoints/last.ckpt")
    refused = [
        (["--model.class_path", "lightning_ft.methods.BayesianFineTuning"], ("DreamBooth", "BayesianFineTuning")),
        (["--model.trainable", "full"], ("model.trainable='lora'", "model.trainable='full'")),
        (["--model.lora_rank", "8"], ("model.lora_rank: 4 in the checkpoint, 8 now",)),
        (["--trainer.max_steps", "1"], ("trainer.max_steps=1", "at step 1")),
    ]
    for extra, named in refused:
        args = _fit_args(tmp_path, subject_dir, root, "--trainer.max_steps", "3", "--ckpt_path", last, *extra,
                         experiment="dreambooth_lora.yaml")  # fmt: skip
        with pytest.raises(ValueError) as error:
            main(args)
        assert all(text in str(error.value) for text in named), (extra, str(error.value))
    assert _versions(root) == ["version_0"]  # refused before anything was written


def test_bad_ckpt_paths_fail_before_anything_is_written(tmp_path, subject_dir):
    root = tmp_path / "runs"
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    for ckpt, error, text in (
        ("last", FileNotFoundError, "no last.ckpt of an earlier run"),
        (str(tmp_path / "missing.ckpt"), FileNotFoundError, "missing.ckpt' does not exist"),
        (str(tmp_path / "notes.ckpt"), ValueError, "notes.ckpt' is not a Lightning checkpoint"),
    ):
        with pytest.raises(error, match=text):
            main(_fit_args(tmp_path, subject_dir, root, "--trainer.max_steps", "2", "--ckpt_path", ckpt))
    with pytest.raises(ValueError, match="trainer.max_steps=0"):
        main(_fit_args(tmp_path, subject_dir, root, "--trainer.max_steps", "0"))
    assert not root.exists()


def test_a_run_that_fails_removes_what_it_wrote_and_keeps_earlier_runs(tmp_path, subject_dir, monkeypatch):
    root = tmp_path / "runs"
    main(_fit_args(tmp_path, subject_dir, root, "--trainer.max_steps", "1"))
    earlier = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def fails(self, batch, batch_idx):
        raise RuntimeError("boom at the first step")

    monkeypatch.setattr(DreamBooth, "training_step", fails)
    with pytest.raises(RuntimeError, match="boom"):
        main(_fit_args(tmp_path, subject_dir, root, "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1"))
    assert _versions(root) == ["version_0"]  # version_1 with its config.yaml, hparams.yaml, metrics.csv: gone
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == earlier


def test_checkpoint_every_sets_the_model_checkpoint_not_the_last_callback(tmp_path, subject_dir):
    cli = main([*_tiny(tmp_path, subject_dir), "--trainer.logger", "false", "--checkpoint_every", "7"], run=False)
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoint._every_n_train_steps == 7
    with pytest.raises(ValueError, match="checkpoint_every=7: trainer.callbacks has no ModelCheckpoint"):
        main([*_tiny(tmp_path, subject_dir), "--trainer.callbacks", "[]", "--checkpoint_every", "7"], run=False)


def test_short_class_names_resolve_in_help(tmp_path):
    for key, name, argument in (
        ("model", "DreamBooth", "prior_loss_weight"),
        ("data", "LimitedDataModule", "instance_dir"),
    ):
        result = subprocess.run([sys.executable, "-m", "lightning_ft.run", "fit", f"--{key}.help", name],
                                capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0 and argument in result.stdout, result.stderr[-500:]


def test_progress_bar_shows_no_negative_epoch_total(tmp_path, subject_dir):
    cli = main([*_tiny(tmp_path, subject_dir), "--trainer.logger", "false"], run=False)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepsProgressBar)
    bar._trainer = cli.trainer
    cli.trainer.fit_loop.max_epochs = -1  # what fit sets when max_steps bounds the run: Lightning shows "2/-2"
    assert bar._get_train_description(2).strip() == "Epoch 2"
    cli.trainer.fit_loop.max_epochs = 5
    assert bar._get_train_description(2).strip() == "Epoch 2/4"
