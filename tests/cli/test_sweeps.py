"""Sweeps: every swept key of every sweep file reaches the module through the CLI; the local runner runs and ranks."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_images

from lightning_ft.run import main
from lightning_ft.sweep import cli_args, expand, load_sweep, parse_args, run_sweep

SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
COMMAND = "command:\n  - python\n  - -m\n  - lightning_ft.run\n  - fit\n  - ${args}\n"


def _lookup(cli, key: str):
    """The parsed value of a dotted config key (model.init_args.x -> the module's hparams x)."""
    parts = key.split(".")
    if parts[0] == "model":
        return cli.model.hparams[parts[-1]]
    if parts[0] == "data":
        return cli.datamodule.hparams[parts[-1]]
    return getattr(cli.trainer, parts[-1])


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.stem)
def test_every_swept_value_is_accepted_by_the_cli(sweep_file, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the sweep command names its experiment relative to the repository
    sweep = load_sweep(sweep_file)
    runs = expand(sweep, "random", count=3, seed=1)
    for name, spec in sweep["parameters"].items():  # every listed value at least once
        for value in spec.get("values", []):
            runs.append({**runs[0], name: value})
    for values in runs:
        args = cli_args(sweep, values)
        assert args[0] == "fit"  # run=False parses without the subcommand
        cli = main([*args[1:], "--trainer.logger", "false"], run=False)
        for key, value in values.items():
            parsed = _lookup(cli, key)
            assert parsed == pytest.approx(value) if isinstance(value, float) else parsed == value, key


def test_random_draws_follow_the_declared_distributions():
    sweep = load_sweep(REPO / "experiments/sweeps/dreambooth_bnn.yaml")
    draws = expand(sweep, "random", count=200, seed=0)
    lr = [d["model.init_args.lr"] for d in draws]
    assert 5e-6 <= min(lr) and max(lr) <= 1e-4
    # log-uniform: about half the draws below the geometric mean of the bounds
    below = sum(v < (5e-6 * 1e-4) ** 0.5 for v in lr) / len(lr)
    assert 0.4 < below < 0.6
    assert {d["model.init_args.sigma_init"] for d in draws} == {0.003, 0.01, 0.03}
    assert {d["trainer.max_steps"] for d in draws} == {300}
    assert expand(sweep, "random", count=200, seed=0) == draws  # reproducible by seed
    assert expand(sweep, "random", count=200, seed=1) != draws


def test_grid_expands_every_combination():
    sweep = load_sweep(REPO / "experiments/sweeps/sdft.yaml")
    runs = expand(sweep, "grid")
    assert len(runs) == 3 * 3 * 2 and len({tuple(sorted(r.items())) for r in runs}) == 18


@pytest.mark.parametrize(
    "text, message",
    [
        ("command: [python]\nparameters: {}\nmetric: {name: x}\n", "must be a list running"),
        (COMMAND + "parameters: {a: {}}\nmetric: {name: x}\n", "'a'"),
        ("parameters: {}\nmetric: {name: x}\n", "lacks 'command'"),
        (COMMAND + "parameters: {a: {distribution: beta}}\nmetric: {name: x}\n", "beta"),
        ("{not yaml", "not valid YAML"),
    ],
)
def test_bad_sweep_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        load_sweep(path)
    assert "bad.yaml" in str(error.value)


def test_local_runner_runs_each_configuration_and_ranks_by_the_metric(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_images(tmp_path / "subject", 2)
    sweep = tmp_path / "tiny.yaml"
    command = ["${env}", "python", "-m", "lightning_ft.run", "fit", "--config", REPO / "experiments/dreambooth.yaml",
               "--config", REPO / "configs/model/tiny_t2i.yaml", "${args}"]  # fmt: skip
    sweep.write_text(
        "command:\n"
        + "".join(f"  - {c}\n" for c in command)
        + "method: grid\nmetric: {name: train/loss, goal: minimize}\n"
        "parameters:\n  model.init_args.lr: {values: [0.001, 0.0001]}\n  trainer.max_steps: {value: 2}\n"
    )
    extra = [f"--data.instance_dir={data}", "--data.num_class_images=0", "--trainer.logger=false",
             "--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path}",
             "--trainer.max_steps=1"]  # fmt: skip
    torch.manual_seed(0)
    rows = run_sweep(sweep, "grid", out=tmp_path / "table", extra=extra)
    assert len(rows) == 2 and {r["model.init_args.lr"] for r in rows} == {0.001, 0.0001}
    # The override after the swept keys wins, and the table reports it, not the sweep file's 2.
    assert [r["trainer.max_steps"] for r in rows] == [1, 1]
    assert rows[0]["train/loss"] <= rows[1]["train/loss"]
    with open(tmp_path / "table.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["train/loss"]) for r in table] == [r["train/loss"] for r in rows]
    assert {r["trainer.max_steps"] for r in table} == {"1"}
    assert "best first" in Path(tmp_path / "table.md").read_text()


def test_runner_options_after_the_file_and_training_overrides_after_the_double_dash():
    args, extra = parse_args(["experiments/sweeps/dreambooth_bnn.yaml", "--method", "random", "--count", "2", "--",
                              "--trainer.max_steps", "60"])  # fmt: skip
    assert (args.sweep, args.method, args.count) == ("experiments/sweeps/dreambooth_bnn.yaml", "random", 2)
    assert extra == ["--trainer.max_steps", "60"]
    args, extra = parse_args(["--count", "3", "s.yaml"])
    assert (args.sweep, args.count, extra) == ("s.yaml", 3, [])
    with pytest.raises(SystemExit):  # a training override without `--` is the runner's error, not a silent pass
        parse_args(["s.yaml", "--trainer.max_steps", "60"])
