"""Sweeps: every swept key of every sweep file reaches the module through the CLI; the local runner checks every
configuration before the first run, runs and ranks, keeps the rows of failed runs and writes one table per sweep."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_images

import lightning_ft.sweep as sweep_module
from lightning_ft.cli import FineTuneCLI
from lightning_ft.core import base
from lightning_ft.run import main
from lightning_ft.sweep import (
    cli_args,
    describe,
    expand,
    fixed_overrides,
    load_sweep,
    parse_args,
    run_sweep,
)

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


def _tiny_sweep(tmp_path: Path, parameters: str, name: str = "tiny") -> Path:
    """A sweep file over a self-contained tiny experiment (random tiny model, 2 images, 2 steps, CSV logger writing
    ``tmp_path/runs/lightning_logs/version_N``): a fit takes well under a second."""
    data = write_images(tmp_path / "subject", 2)
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(
        "seed_everything: 0\n"
        "trainer:\n  accelerator: cpu\n  max_steps: 2\n  enable_progress_bar: false\n"
        "  enable_model_summary: false\n"
        f"  default_root_dir: {tmp_path / 'runs'}\n"
        f"  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path / 'runs'}}}}}\n"
        "model:\n  class_path: lightning_ft.methods.DreamBooth\n  init_args: {trainable: full, lr: 1.0e-3}\n"
        "data:\n  class_path: lightning_ft.data.LimitedDataModule\n"
        f"  init_args: {{instance_dir: {data}, instance_prompt: a sks star, resolution: 32, batch_size: 2}}\n"
    )
    command = ["${env}", "python", "-m", "lightning_ft.run", "fit", "--config", experiment,
               "--config", REPO / "configs/model/tiny_t2i.yaml", "${args}"]  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        "command:\n" + "".join(f"  - {c}\n" for c in command)
        + "method: grid\nmetric: {name: train/loss, goal: minimize}\nparameters:\n" + parameters
    )  # fmt: skip
    return path


def _table(folder: Path) -> tuple[list[dict], str]:
    with open(folder / "results.csv") as handle:
        return list(csv.DictReader(handle)), (folder / "results.md").read_text()


def test_a_failed_run_is_a_row_with_its_error_the_sweep_goes_on_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # lr 1e30 passes every check (it is > 0) and diverges at the second step: a failure only the run can find. It is
    # second of three, so the run after it shows that the sweep goes on.
    sweep = _tiny_sweep(tmp_path, "  model.init_args.lr: {values: [0.001, 1.0e+30, 0.0001]}\n"
                                  "  trainer.max_steps: {value: 3}\n")  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        sweep_module.main([str(sweep), "--", "--trainer.max_steps", "2", "--model.init_args.weight_decay=0.0"])
    assert stop.value.code == 1
    out = capsys.readouterr().out
    assert "1 of 3 runs FAILED (run 1: FloatingPointError: non-finite training loss" in out

    folder = tmp_path / "runs/sweeps/tiny/sweep_1"
    rows, markdown = _table(folder)
    assert [(r["run"], r["status"]) for r in rows[2:]] == [("1", "failed")]  # finished rows first, the failure last
    assert {r["run"] for r in rows[:2]} == {"0", "2"} and {r["status"] for r in rows[:2]} == {"ok"}
    failed = rows[2]
    assert failed["model.init_args.lr"] == "1e+30"
    assert failed["error"].startswith("FloatingPointError: non-finite training loss nan at global step 1")
    assert failed["train/loss"] == "" and failed["run_folder"] == ""  # it failed before a checkpoint: folder removed
    # Ranked by the metric, best first; each finished row names the folder its run wrote, with the run's report.
    losses = [float(r["train/loss"]) for r in rows[:2]]
    assert losses == sorted(losses) and all(math.isfinite(v) for v in losses)
    folders = [r["run_folder"] for r in rows[:2]]
    assert len(set(folders)) == 2
    for row in rows[:2]:
        run_folder = tmp_path / row["run_folder"]  # relative to the working directory
        assert run_folder.parent == tmp_path / "runs/lightning_logs" and run_folder.name.startswith("version_")
        assert (run_folder / "report.html").is_file()
        config = yaml.safe_load((run_folder / "config.yaml").read_text())  # the row's run, not another's
        assert config["model"]["init_args"]["lr"] == float(row["model.init_args.lr"])
    # The fixed overrides: CSV columns and each row's exact command; the markdown header, with the sweep's command.
    # trainer.max_steps is also swept (value 3): the override wins, and the column says what the runs used.
    assert {r["trainer.max_steps"] for r in rows} == {"2"}
    assert {r["model.init_args.weight_decay"] for r in rows} == {"0.0"}
    assert all(r["command"].endswith("--trainer.max_steps 2 --model.init_args.weight_decay=0.0") for r in rows)
    assert "Fixed overrides (after `--`, the same in every run): `--trainer.max_steps 2 " in markdown
    assert "--model.init_args.weight_decay=0.0`" in markdown and "override wins: trainer.max_steps" in markdown
    assert f"python -m lightning_ft.sweep {sweep} --method grid -- --trainer.max_steps 2" in markdown
    assert "| 1 | failed | 1e+30 | 2 |" in markdown and "2 ok, 1 failed" in markdown
    table = [line.replace("\\|", "") for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and len({line.count("|") for line in table}) == 1  # header, rule, 3 rows: one shape


def test_a_killed_sweep_keeps_the_rows_of_the_runs_that_finished(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = _tiny_sweep(tmp_path, "  model.init_args.lr: {values: [0.001, 0.0002, 0.0001]}\n")
    fits, snapshot, original = [], [], FineTuneCLI._run_subcommand

    def fit_then_kill(self, subcommand):  # the second fit is interrupted (Ctrl-C, or the job's time limit)
        fits.append(subcommand)
        if len(fits) == 2:
            # Before any handler of the interruption ran: the table on disk already holds the first run's row.
            snapshot.extend(_table(tmp_path / "tables/sweep_1")[0])
            raise KeyboardInterrupt
        original(self, subcommand)

    monkeypatch.setattr(FineTuneCLI, "_run_subcommand", fit_then_kill)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, "grid", out=tmp_path / "tables")
    rows, markdown = _table(tmp_path / "tables/sweep_1")
    assert [(r["run"], r["status"]) for r in snapshot] == [("0", "ok"), ("1", "pending"), ("2", "pending")]
    assert [(r["run"], r["status"]) for r in rows] == [("0", "ok"), ("1", "interrupted"), ("2", "pending")]
    assert rows[1]["error"] == "KeyboardInterrupt"
    assert math.isfinite(float(rows[0]["train/loss"])) and (tmp_path / rows[0]["run_folder"] / "report.html").is_file()
    assert "1 ok, 1 interrupted, 1 pending" in markdown
    assert not list((tmp_path / "tables/sweep_1").glob(".results*"))  # no temporary file left beside the tables


def test_each_sweep_writes_its_own_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = _tiny_sweep(tmp_path, "  model.init_args.lr: {values: [0.001]}\n")
    first = run_sweep(sweep, "grid")
    before = (first.folder / "results.csv").read_text()
    second = run_sweep(sweep, "grid", extra=["--trainer.max_steps", "1"])
    assert (first.folder, second.folder) == (Path("runs/sweeps/tiny/sweep_1"), Path("runs/sweeps/tiny/sweep_2"))
    assert (first.folder / "results.csv").read_text() == before  # the first sweep's table is untouched
    (one,), _ = _table(first.folder)
    (two,), _ = _table(second.folder)
    assert "trainer.max_steps" not in one and two["trainer.max_steps"] == "1"  # each table: its own sweep's overrides
    assert one["run_folder"].endswith("version_0") and two["run_folder"].endswith("version_1")


@pytest.mark.parametrize(
    "parameters, message",
    [
        (
            "  model.init_args.lr: {values: [0.001, -1]}\n",
            "run 1 (model.init_args.lr=-1): ValueError: model.lr=-1.0: the learning rate must be > 0",
        ),
        ("  model.init_args.lrr: {values: [0.001]}\n", "Option 'lrr' is not accepted"),
        (
            "  model.init_args.lr: {values: [0.001, fast]}\n",
            "run 1 (model.init_args.lr='fast'): ArgumentError: Parser key \"model\": Problem with given class_path "
            "'lightning_ft.methods.DreamBooth': Parser key \"lr\": Expected a <class 'float'>. Got value: fast",
        ),
        ("  trainer.max_steps: {values: [2, 0]}\n", "run 1 (trainer.max_steps=0): ValueError: trainer.max_steps=0: "),
        (
            "  data.init_args.batch_size: {values: [2, 0]}\n",
            "run 1 (data.init_args.batch_size=0): ValueError: data.batch_size=0: must be > 0",
        ),
    ],
    ids=["negative-lr", "unknown-key", "not-a-number", "zero-steps", "zero-batch"],
)
def test_a_bad_value_is_refused_before_any_run_starts(tmp_path, monkeypatch, parameters, message):
    monkeypatch.chdir(tmp_path)
    sweep = _tiny_sweep(tmp_path, parameters)
    with pytest.raises(ValueError, match="refused before any run started") as error:
        run_sweep(sweep, "grid")
    assert message in str(error.value)
    assert not (tmp_path / "runs").exists()  # no run folder, no table: nothing ran


def test_settings_checks_refuse_bad_values_without_loading_weights(tmp_path, monkeypatch):
    """--check settings (and auto, once a build is slow) builds the first configuration only; the others meet the
    parser, the data's construction and the model's constructor up to its weights."""
    monkeypatch.chdir(tmp_path)
    loads, load = [], base.load_components
    monkeypatch.setattr(base, "load_components", lambda *a, **k: loads.append(1) or load(*a, **k))
    sweep = _tiny_sweep(tmp_path, "  model.init_args.lr: {values: [0.001, -1]}\n"
                                  "  data.init_args.batch_size: {values: [2, 0]}\n")  # fmt: skip
    with pytest.raises(ValueError) as error:
        run_sweep(sweep, "grid", check="settings")
    assert len(loads) == 1  # the first configuration's build
    refused = str(error.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in refused] == [
        "run 1 (model.init_args.lr=0.001, data.init_args.batch_size=0)",
        "run 2 (model.init_args.lr=-1, data.init_args.batch_size=2)",
        "run 3 (model.init_args.lr=-1, data.init_args.batch_size=0)",
    ]
    assert "model.lr=-1.0: the learning rate must be > 0" in refused[1] and "data.batch_size=0" in refused[0]
    # auto switches to the settings checks once a build (timed from the second) takes longer than BUILD_SECONDS
    # (here: any build), and builds every configuration while builds are fast
    sweep = _tiny_sweep(tmp_path, "  model.init_args.lr: {values: [0.001, 0.01]}\n"
                                  "  data.init_args.batch_size: {values: [2, 0]}\n", name="auto")  # fmt: skip
    for limit, builds in [(-1.0, 2), (1e9, 4)]:
        loads.clear()
        monkeypatch.setattr(sweep_module, "BUILD_SECONDS", limit)
        with pytest.raises(ValueError, match="2 of 4 configurations refused") as error:
            run_sweep(sweep, "grid")
        assert len(loads) == builds
        assert "run 3 (model.init_args.lr=0.01, data.init_args.batch_size=0)" in str(error.value)  # either way
    assert not (tmp_path / "runs").exists()


def test_fixed_overrides_and_error_summaries():
    assert fixed_overrides(["--trainer.max_steps", "2", "--model.lr=-1", "--config", "a.yaml", "--config=b.yaml",
                            "--model.init_args.lr", "-1"]) == {  # fmt: skip
        "trainer.max_steps": "2", "model.lr": "-1", "config": "a.yaml b.yaml", "model.init_args.lr": "-1"
    }  # fmt: skip
    assert describe(ValueError("model.lr=-1.0: the learning rate must be > 0")) == (
        "ValueError: model.lr=-1.0: the learning rate must be > 0"
    )
    assert describe(KeyError()) == "KeyError"


def test_runner_options_after_the_file_and_training_overrides_after_the_double_dash():
    args, extra = parse_args(["experiments/sweeps/dreambooth_bnn.yaml", "--method", "random", "--count", "2", "--",
                              "--trainer.max_steps", "60"])  # fmt: skip
    assert (args.sweep, args.method, args.count) == ("experiments/sweeps/dreambooth_bnn.yaml", "random", 2)
    assert extra == ["--trainer.max_steps", "60"]
    args, extra = parse_args(["--count", "3", "s.yaml"])
    assert (args.sweep, args.count, args.check, extra) == ("s.yaml", 3, "auto", [])
    assert parse_args(["s.yaml", "--check", "settings", "--out", "t"])[0].check == "settings"
    with pytest.raises(SystemExit):
        parse_args(["s.yaml", "--check", "cheap"])
    with pytest.raises(SystemExit):  # a training override without `--` is the runner's error, not a silent pass
        parse_args(["s.yaml", "--trainer.max_steps", "60"])
