"""What a run folder holds, read once: the logger's metrics, the monitor's curves, the sample grids, the resolved
config and what the run cost.

A run folder is what a fit writes under its logger (``runs/<name>/lightning_logs/version_N``, or
``default_root_dir`` without a logger): ``metrics.csv`` (CSVLogger; one row per logging call, most cells empty),
``corruption_stage.csv`` (CorruptionStageMonitor), ``samples/step_*.png`` (SampleGridLogger), ``config.yaml``
(the resolved config), ``run_cost.json`` (RunReport) and ``export/``. Any of them may be missing: the reader says
which in ``notes`` and the report leaves that section out; a file that is there but cannot be read is an error
naming it.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lightning_ft.images import image_files
from lightning_ft.report.cost import COST_FILE
from lightning_ft.report.evaluation import read_evaluation

RUN_FILES = ("metrics.csv", "corruption_stage.csv", "config.yaml", "hparams.yaml", "samples")
#: What the SampleGridLogger writes beside its grids: each row's text (prompt, ``class N`` or empty) and the seeds.
#: The name is its ``ROWS_FILE``, repeated here: the report layer sits below the callbacks and cannot import them.
ROWS_FILE = "rows.json"
SAMPLE_NAME = re.compile(r"step_(\d+)\.png$")


def _number(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_csv_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, float | str | None]]:
    """Rows of a CSV with numbers parsed (empty cells None, text kept); ``required`` columns must be in the header."""
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise ValueError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(header) or 'none'})")
            rows = []
            for row in reader:
                parsed = {}
                for key, text in row.items():
                    value = _number(text)
                    parsed[key] = value if value is not None or not text else text
                rows.append(parsed)
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read as CSV ({error})") from None
    return rows


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


@dataclass
class RunFolder:
    """The readable content of one run folder (``read_run`` builds it)."""

    path: Path
    metrics: list[dict] | None = None
    corruption: list[dict] | None = None
    samples: list[tuple[int, Path]] = field(default_factory=list)
    config: dict | None = None
    config_text: str | None = None
    cost: dict | None = None
    notes: dict[str, str] = field(default_factory=dict)  # section -> why it is missing
    grid_rows: list[str] | None = None  # the texts of samples/rows.json, one per grid row
    evaluation: dict | None = None  # evaluation/evaluation.json (python -m lightning_ft.evaluate RUN), if written
    evaluation_grid: Path | None = None

    # ------------------------------------------------------------------------------------------ metrics
    def columns(self) -> list[str]:
        return sorted({k for row in self.metrics or [] for k in row})

    def series(self, column: str, rows: list[dict] | None = None) -> tuple[list[int], list[float]]:
        """(steps, values) of ``column`` where it has a number, in row order."""
        steps, values = [], []
        for row in self.metrics if rows is None else rows:
            value, step = row.get(column), row.get("step")
            if finite(value) and finite(step):
                steps.append(int(step))
                values.append(float(value))
        return steps, values

    def last(self, column: str) -> float | None:
        _, values = self.series(column, self.metrics or [])
        return values[-1] if values else None

    # ------------------------------------------------------------------------------------------- config
    def callback_args(self, name: str) -> dict | None:
        """``init_args`` of the first callback of ``trainer.callbacks`` whose class is ``name``, or None."""
        callbacks = ((self.config or {}).get("trainer") or {}).get("callbacks") or []
        for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
            if isinstance(callback, dict) and str(callback.get("class_path", "")).rsplit(".", 1)[-1] == name:
                return callback.get("init_args") or {}
        return None

    def section(self, key: str) -> dict:
        """``init_args`` of the config's ``model`` or ``data`` (empty when unknown)."""
        entry = (self.config or {}).get(key) or {}
        return entry.get("init_args") or {} if isinstance(entry, dict) else {}

    def class_name(self, key: str) -> str | None:
        entry = (self.config or {}).get(key) or {}
        path = entry.get("class_path") if isinstance(entry, dict) else None
        return str(path).rsplit(".", 1)[-1] if path else None

    @property
    def method(self) -> str:
        return self.class_name("model") or "unknown method"

    def sample_rows(self) -> list[str] | None:
        """Row labels of the sample grids, one per grid row: what the SampleGridLogger wrote beside them
        (``samples/rows.json``), else what config.yaml says it sampled (runs without that file): the grid's own
        prompts (or labels), else the data's ``sample_prompts`` (or ``sample_labels``), the rows of a grid that
        names none. Only rows.json knows which of the data's two a model read: the config's answer is the prompts."""
        if self.grid_rows is not None:
            return self.grid_rows if any(self.grid_rows) else None  # rows asked with nothing have no label
        args = self.callback_args("SampleGridLogger") or {}
        if args.get("prompts") is not None or args.get("labels") is not None:  # the grid's own rows win, as it drew
            rows = args.get("prompts") or args.get("labels")
            return [str(r) for r in rows] if rows else None
        data = self.section("data")
        if data.get("sample_prompts"):
            return [str(r) for r in data["sample_prompts"]]
        if data.get("sample_labels"):
            return [f"class {label}" for label in data["sample_labels"]]  # as the grid's rows.json names them
        return None

    def instance_images(self) -> tuple[list[Path], str | None]:
        """The instance images named by the config's ``data.instance_dir``, and why there are none if so."""
        folder = self.section("data").get("instance_dir")
        if not folder:
            return [], "the config names no data.instance_dir"
        path = Path(folder).expanduser()
        if not path.is_dir():
            return [], f"data.instance_dir {folder} is not on this machine any more"
        files = image_files(path)  # the files the data module trains on (any format Pillow reads)
        return files, None if files else f"data.instance_dir {folder} holds no image"


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def read_run(path: str | Path) -> RunFolder:
    """Read a run folder; a folder holding none of a run's files, or a file that cannot be read, is an error that
    names it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {str(path)!r} does not exist")
    if not is_run_folder(path):
        raise FileNotFoundError(
            f"{path}: no metrics.csv (nor corruption_stage.csv, config.yaml or samples/): not a run folder; a fit "
            "writes one under runs/<name>/lightning_logs/version_N"
        )
    run = RunFolder(path=path)
    metrics = path / "metrics.csv"
    if metrics.exists():
        run.metrics = read_csv_rows(metrics, ("step",))
    else:
        run.notes["loss"] = "no metrics.csv in this folder: the run had no CSVLogger, so the loss is not on record"
    stage = path / "corruption_stage.csv"
    if stage.exists():
        run.corruption = sorted(read_csv_rows(stage, ("step", "fidelity")), key=lambda r: r["step"])
    else:
        run.notes["corruption"] = (
            "no corruption_stage.csv in this folder: the run had no CorruptionStageMonitor "
            "(lightning_ft.callbacks.CorruptionStageMonitor draws these curves and names the stage)"
        )
    run.samples = sorted(
        (int(m.group(1)), p) for p in (path / "samples").glob("step_*.png") if (m := SAMPLE_NAME.search(p.name))
    )
    if not run.samples:
        run.notes["samples"] = "no samples/step_*.png in this folder: the run had no SampleGridLogger"
    rows = path / "samples" / ROWS_FILE
    if rows.exists():
        try:
            run.grid_rows = json.loads(rows.read_text())["rows"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{rows}: not the grid's rows ({type(error).__name__}: {error})") from None
        if not isinstance(run.grid_rows, list):
            raise ValueError(f"{rows}: 'rows' is not a list of row texts")
        run.grid_rows = [str(r) for r in run.grid_rows]
    config = path / "config.yaml"
    if config.exists():
        run.config_text = config.read_text()
        try:
            run.config = yaml.safe_load(run.config_text)
        except yaml.YAMLError as error:
            raise ValueError(f"{config}: not valid YAML ({error})") from None
        if not isinstance(run.config, dict):
            raise ValueError(f"{config}: holds no mapping")
    else:
        run.notes["config"] = "no config.yaml in this folder (the CLI writes it; a fit started from Python does not)"
    cost = path / COST_FILE
    if cost.exists():
        try:
            run.cost = json.loads(cost.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{cost}: not valid JSON ({error})") from None
    else:
        run.notes["cost"] = f"no {COST_FILE} in this folder: it is measured during the fit by RunReport"
    run.evaluation, run.evaluation_grid = read_evaluation(path)
    if run.metrics is not None and not any(finite(r.get("fid/fid")) for r in run.metrics):
        run.notes["fid"] = "no FID/KID in metrics.csv: the run had no FIDMonitor (lightning_ft.callbacks.FIDMonitor)"
    return run


def find_runs(path: str | Path) -> list[Path]:
    """``path`` itself when it is a run folder, else every run folder under it (sorted), e.g. every version of
    ``runs/<name>`` or every run of a sweep; ``export/`` folders are not searched."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    if is_run_folder(path):
        return [path]
    found = set()
    for name in ("metrics.csv", "corruption_stage.csv", "config.yaml"):
        for file in path.rglob(name):
            if "export" not in file.relative_to(path).parts and is_run_folder(file.parent):
                found.add(file.parent)
    if not found:
        raise FileNotFoundError(f"{path}: no run folder under it (none holds metrics.csv, corruption_stage.csv or "
                                "config.yaml)")  # fmt: skip
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]
