"""Hyperparameter sweeps: W&B sweep files, and a local runner for users without a W&B server.

A sweep file (``experiments/sweeps/*.yaml``) is in W&B's format; its ``command`` runs the project's CLI with the swept
keys as overrides, so the same file works with ``wandb sweep FILE`` + ``wandb agent ID`` and with

    python -m lightning_ft.sweep experiments/sweeps/dreambooth_bnn.yaml --method grid [--count N] [--out DIR] \
        [--check auto|build|settings] [-- --trainer.max_steps 60 ...]

The local runner expands the file's ``parameters`` (``grid``: every combination of ``values``; ``random``: ``count``
draws, ``values`` uniformly and ``distribution`` ``uniform`` / ``log_uniform_values`` / ``int_uniform`` /
``q_uniform`` as W&B defines them) and runs the fits one after the other in this process. W&B's ``bayes`` method needs
its server; locally it is rejected. Written here because W&B's own local controller needs a W&B server too.

- **Every configuration is checked before the first run** (``--check``): ``build`` starts the CLI on each one as the
  run will (``fit`` and every override included), which parses it and builds the model, data and trainer with their
  construction-time checks, and stops before training; ``settings`` fully builds the first configuration only and
  checks the others with the parser, the data's construction and the model's constructor up to the point where it
  would load weights (every ``DiffusionBase`` settings check, and the methods' checks that precede it). ``auto`` (the
  default) builds each while a build (timed from the second) costs under ``BUILD_SECONDS``, then switches to the
  settings checks. Every refused configuration is listed at once, and nothing runs.
- **Each invocation writes its own table**, ``<out>/sweep_<N>/results.csv`` and ``results.md`` (``out`` defaults to
  ``runs/sweeps/<file stem>``; N is one more than the highest there), never overwriting an earlier sweep's.
- **The table is rewritten after every run** (temporary file + rename), listing every planned run: finished ones
  best first by the sweep's ``metric``, then failed (with the exception's type and first line), then pending; each row
  names its run folder (``trainer.log_dir``, where ``report.html`` is) and, in the CSV, its exact command; the header
  gives the sweep's command and the fixed overrides (everything after ``--``), which the CSV also has as columns.
- **A failing run does not stop the sweep**: the next one starts, and the sweep exits with status 1 at the end,
  naming the failed runs. Ctrl-C or SIGTERM does stop it: the run's row reads ``interrupted`` (its folder holds the
  ``last.ckpt`` the CLI writes at a signal), and the exit status is the run's (130, 143).

Runs share this process: a multi-process strategy whose launcher re-runs the command line (``ddp`` on CPUs) would re-run
the sweep; run those with ``wandb agent``, or one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import io
import itertools
import logging
import math
import os
import random
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import yaml

PLACEHOLDERS = ("${env}", "${interpreter}", "${program}")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform", "q_uniform")
CHECKS = ("auto", "build", "settings")
#: ``--check auto`` builds every configuration while one build (model, data, trainer) takes less than this; above it
#: (a real pretrained model: seconds to minutes of loading weights each) the others get the cheap settings checks.
BUILD_SECONDS = 10.0
STATUSES = ("ok", "failed", "interrupted", "pending")


def load_sweep(path: str | Path) -> dict:
    """Read and check a sweep file; errors name the file and the key at fault."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sweep file {str(path)!r} does not exist")
    try:
        sweep = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"sweep file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(sweep, dict):
        raise ValueError(f"sweep file {str(path)!r} must hold a mapping")
    for key in ("command", "parameters", "metric"):
        if key not in sweep:
            raise ValueError(f"sweep file {str(path)!r} lacks '{key}'")
    command = sweep["command"]
    if not isinstance(command, list) or "${args}" not in command or "lightning_ft.run" not in command:
        raise ValueError(
            f"sweep file {str(path)!r}: 'command' must be a list running 'python -m lightning_ft.run ...' with "
            "'${args}' where the swept keys go"
        )
    if not isinstance(sweep["metric"], dict) or "name" not in sweep["metric"]:
        raise ValueError(f"sweep file {str(path)!r}: 'metric' needs 'name' (and 'goal': minimize|maximize)")
    for name, spec in sweep["parameters"].items():
        if not isinstance(spec, dict) or not ({"value", "values", "distribution"} & set(spec)):
            raise ValueError(f"sweep file {str(path)!r}: parameter {name!r} needs 'value', 'values' or 'distribution'")
        if "distribution" in spec and spec["distribution"] not in DISTRIBUTIONS:
            raise ValueError(
                f"sweep file {str(path)!r}: parameter {name!r} has distribution {spec['distribution']!r}; "
                f"the local runner knows {DISTRIBUTIONS}"
            )
    return sweep


def _draw(spec: dict, rng: random.Random):
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    low, high = spec["min"], spec["max"]
    kind = spec["distribution"]
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if kind == "int_uniform":
        return rng.randint(low, high)
    q = spec.get("q", 1)
    return round(rng.uniform(low, high) / q) * q


def expand(sweep: dict, method: str = "grid", count: int | None = None, seed: int = 0) -> list[dict]:
    """The runs of a sweep: a list of {key: value}."""
    params = sweep["parameters"]
    if method == "grid":
        for name, spec in params.items():
            if "distribution" in spec:
                raise ValueError(f"grid sweeps need 'values' lists; parameter {name!r} has a distribution")
        names = list(params)
        choices = [params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names]
        runs = [dict(zip(names, combo)) for combo in itertools.product(*choices)]
        return runs[:count] if count else runs
    if method == "random":
        rng = random.Random(seed)
        return [{name: _draw(spec, rng) for name, spec in params.items()} for _ in range(count or 10)]
    raise ValueError(f"method {method!r}: the local runner does 'grid' or 'random' ('bayes' needs a W&B server)")


def cli_args(sweep: dict, values: dict) -> list[str]:
    """The arguments of ``lightning_ft.run.main`` for one run: the command after ``-m lightning_ft.run``, with
    ``${args}`` replaced by ``--key=value`` as W&B's agent does."""
    command = [c for c in sweep["command"] if c not in PLACEHOLDERS]
    command = command[command.index("lightning_ft.run") + 1 :]
    swept = [f"--{k}={v}" for k, v in values.items()]
    out = []
    for part in command:
        out.extend(swept if part == "${args}" else [part])
    return out


def used_value(cli, key: str, drawn):
    """The value of dotted ``key`` in the run's parsed config (``drawn`` when the config does not hold it)."""
    config = cli.config[cli.subcommand] if cli.subcommand else cli.config
    value = config.get(key, drawn)
    return list(value) if isinstance(value, tuple) else value


def fixed_overrides(extra: list[str]) -> dict[str, str]:
    """The overrides after ``--`` as ``{key: value}``, as written (``--k=v`` or ``--k v``); a repeated key (``--config
    a --config b``) keeps every value, space-separated."""
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        part = extra[i]
        if part.startswith("-"):
            key, sep, value = part.lstrip("-").partition("=")
            if not sep and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value, i = extra[i + 1], i + 1  # `--k v`; a negative number (`-1`) is a value, not an option
            out[key] = f"{out[key]} {value}" if key in out else value
        i += 1
    return out


# ------------------------------------------------------------------------------------------- starting the CLI
class _WeightsReached(BaseException):
    """Raised in place of loading a model's weights (``--check settings``): every constructor check before that has
    passed. A BaseException, so that the ``except Exception`` of jsonargparse and the CLI on the way do not take it
    for a failure of the configuration."""


def _stop_at_weights(*args, **kwargs):
    raise _WeightsReached


def _unwrap(error: BaseException) -> BaseException:
    from lightning_ft.cli import _unwrap_union_error

    return _unwrap_union_error(error) if isinstance(error, Exception) else error


def describe(error: BaseException) -> str:
    """``Type: message`` of an error; of jsonargparse's report of a bad class argument (a dump of every member of
    ``LightningModule | None`` it tried), the parts that name the key and the complaint."""
    text = str(error).strip()
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "Problem with given class_path" in line), None)
    if "Does not validate against any of the Union subtypes" in text and start is not None:
        indent = len(lines[start]) - len(lines[start].lstrip())
        inner = []
        for line in lines[start + 1 :]:
            if len(line) - len(line.lstrip()) <= indent:
                break
            inner.append(line.strip())
        text = " ".join([lines[0].strip(), lines[start].strip().lstrip("- "), *inner])
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def first_line(error: BaseException) -> str:
    """What a table cell holds of an error: its type and the first line of its message."""
    return describe(error).splitlines()[0]


def _start_cli(args: list[str], fit: bool = True, load_weights: bool = True):
    """Start the project's CLI on ``args`` exactly as ``python -m lightning_ft.run`` would (``lightning_ft.run.main``):
    ``fit=False`` stops after the model, data and trainer are built and checked (what the run does before training),
    ``load_weights=False`` stops the model's constructor where it would load weights. Returns ``(cli, error)``:
    ``cli`` is the CLI object as far as it got (its parsed config, its trainer once built; None when parsing failed),
    ``error`` what the run raised (None when it finished), a KeyboardInterrupt or SystemExit included (a signal
    during fit ends in SystemExit 130 / 143): the caller records it, then raises it.

    Done by patching ``FineTuneCLI`` for the duration of the call (the runs of a sweep are sequential, in this
    process): the sweep needs the CLI object of a run that failed (to name its folder) and a parser that raises its
    message instead of printing it and exiting, and ``main`` returns neither."""
    from lightning_ft import run
    from lightning_ft.cli import FineTuneCLI
    from lightning_ft.core import base

    seen = []
    init_parser, before = FineTuneCLI.init_parser, FineTuneCLI.before_instantiate_classes

    def raising_parser(self, **kwargs):
        parser = init_parser(self, **kwargs)
        parser.exit_on_error = False  # jsonargparse prints to stderr and exits 2 otherwise: the sweep needs the message
        return parser

    def recorded(self):
        seen.append(self)  # parsed by now; its trainer, once built, names the run folder even if the run fails
        before(self)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(FineTuneCLI, "init_parser", raising_parser))
        stack.enter_context(mock.patch.object(FineTuneCLI, "before_instantiate_classes", recorded))
        if not fit:
            stack.enter_context(mock.patch.object(FineTuneCLI, "_run_subcommand", lambda self, subcommand: None))
        if not load_weights:
            stack.enter_context(mock.patch.object(base, "load_components", _stop_at_weights))
        stack.enter_context(warnings.catch_warnings())
        # Lightning warns when args are given while sys.argv holds others: here sys.argv is the sweep's own.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            run.main(args)
            error = None
        except _WeightsReached:  # load_weights=False: the model's settings checks passed
            error = None
        except Exception as caught:  # noqa: BLE001 - any failure of one run is that run's row, not the sweep's end
            error = _unwrap(caught)
        except (KeyboardInterrupt, SystemExit) as stop:
            error = stop
    cli = seen[-1] if seen else None
    if not load_weights and error is None and cli is not None and getattr(cli, "datamodule", None) is None:
        error = _build_data(cli)
    return cli, error


def _build_data(cli) -> Exception | None:
    """Build the data module (and callbacks) of a configuration whose model stopped at its weights: the model is built
    first, so its stop left them unbuilt, and their construction-time checks are cheap."""
    config = cli.config.clone()
    config[f"{cli.subcommand}.model"] = None
    try:
        cli.parser.instantiate_classes(config)
    except Exception as error:  # noqa: BLE001 - reported as the configuration's refusal
        return _unwrap(error)
    return None


@contextlib.contextmanager
def _quiet():
    """Silence the builds of the checks: each prints Lightning's seed, device and data lines, once per configuration."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _label(values: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def check_configurations(args: list[list[str]], runs: list[dict], check: str = "auto") -> list[dict]:
    """Check every configuration before the first run; raise one ValueError listing each refused one (its swept values
    and the error). Returns, per run, the values of the swept keys as parsed (what the run will use).

    ``check``: ``build`` builds each (model, data, trainer; their construction-time checks, the CLI's input checks),
    ``settings`` builds the first and checks the others with the parser, the data's construction and the model's
    constructor up to loading weights, ``auto`` builds each while a build takes under ``BUILD_SECONDS`` (timed from
    the second: the first also pays for the imports)."""
    if check not in CHECKS:
        raise ValueError(f"check={check!r}: must be one of {CHECKS}")
    refused, used, build = [], [], check != "settings"
    for i, (run_args, values) in enumerate(zip(args, runs)):
        started = time.perf_counter()
        full = i == 0 or build  # the first is always built: it checks what every run shares (paths, data folder)
        with _quiet():
            cli, error = _start_cli(run_args, fit=False, load_weights=full)
        if isinstance(error, KeyboardInterrupt):
            raise error
        if isinstance(error, SystemExit):  # e.g. --help or --print_config among the overrides: it printed and exited
            error = RuntimeError(f"the CLI exited (status {error.code}) instead of building the run")
        seconds = time.perf_counter() - started
        if error is not None:
            refused.append(f"run {i} ({_label(values)}): {describe(error)}")
        used.append({k: used_value(cli, k, v) for k, v in values.items()} if cli is not None else dict(values))
        del cli
        gc.collect()  # one built model at a time
        # Timed from the second build on: the first also pays for this process's imports (seconds, on any model).
        if check == "auto" and build and i >= 1 and seconds > BUILD_SECONDS and i + 1 < len(runs):
            build = False
            print(
                f"lightning-ft sweep: building a configuration took {seconds:.0f} s; the remaining {len(runs) - i - 1} "
                "are checked by the parser, the data's construction and the model's settings checks (--check build "
                "builds each)",
                flush=True,
            )
    if refused:
        raise ValueError(
            f"lightning-ft sweep: {len(refused)} of {_count(len(runs), 'configuration')} refused before any run "
            "started (nothing was run):\n  " + "\n  ".join(refused)
        )
    return used


# ------------------------------------------------------------------------------------------------- the table
class SweepResult(NamedTuple):
    rows: list[dict]
    folder: Path  # holds results.csv and results.md

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "failed"]


def new_table_folder(out: Path) -> Path:
    """``out/sweep_<N>`` with N one more than the highest there, created (atomically: two sweeps started at once get
    two folders)."""
    out.mkdir(parents=True, exist_ok=True)
    taken = [p.name.removeprefix("sweep_") for p in out.glob("sweep_*")]
    n = max((int(t) for t in taken if t.isdigit()), default=0) + 1
    while True:
        try:
            (out / f"sweep_{n}").mkdir()
            return out / f"sweep_{n}"
        except FileExistsError:
            n += 1


def _ranked(rows: list[dict], metric: str, goal: str) -> list[dict]:
    def key(row):
        value = row[metric]
        finished = row["status"] == "ok" and isinstance(value, float) and not math.isnan(value)
        score = (value if goal == "minimize" else -value) if finished else 0.0
        return (STATUSES.index(row["status"]), not finished, score, row["run"])

    return sorted(rows, key=key)


def _write_atomically(path: Path, text: str) -> None:
    # A sweep killed mid-write keeps the previous table whole: write beside it, then rename over it.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False, newline="") as f:
        f.write(text)
    os.replace(f.name, path)


def _cell(value, markdown: bool) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else (f"{value:.4g}" if markdown else repr(value))
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ") if markdown else text


def write_table(folder: Path, rows: list[dict], header: dict) -> None:
    """``results.csv`` and ``results.md`` in ``folder``, best first; ``header``: command, run command, fixed
    overrides (``extra``), swept keys, metric, goal, method, started."""
    metric, goal, swept, fixed = header["metric"], header["goal"], header["swept"], header["fixed"]
    ranked = _ranked(rows, metric, goal)
    # CSV: one row per run; the fixed overrides as columns (the same in every row) and each run's exact command, so
    # the file alone says how every row was made. Keys also swept have their column already (the value used).
    fixed_columns = [k for k in fixed if k not in swept]
    keys = ["run", "status", *swept, metric, "seconds", "run_folder", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*keys, *fixed_columns, "command"], lineterminator="\n")
    writer.writeheader()
    for row in ranked:
        writer.writerow({**{k: _cell(row[k], False) for k in keys}, **{k: fixed[k] for k in fixed_columns},
                         "command": row["command"]})  # fmt: skip
    _write_atomically(folder / "results.csv", buffer.getvalue())

    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    overridden = [k for k in fixed if k in swept]
    lines = [
        f"# Sweep `{header['path']}`: {folder.name}",
        "",
        f"- Command: `{header['command']}`",
        f"- Each run: `{header['run_command']}`",
        "- Fixed overrides (after `--`, the same in every run): "
        + (f"`{shlex.join(header['extra'])}`" if header["extra"] else "none")
        + (f" (also swept, and the override wins: {', '.join(overridden)})" if overridden else ""),
        f"- {header['method']}, {_count(len(rows), 'run')}, started {header['started']}: "
        + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]),
        f"- Ranked by `{metric}` ({goal}), best first; failed and pending runs last. `run folder` holds the run's "
        "`report.html`; `results.csv` has each run's exact command.",
        "",
        "| run | status | " + " | ".join(swept) + f" | {metric} | seconds | run folder | error |",
        "|" + "---|" * (len(swept) + 6),
    ]
    for row in ranked:
        cells = [row["run"], row["status"], *(row[k] for k in swept), row[metric], row["seconds"], row["run_folder"],
                 row["error"]]  # fmt: skip
        lines.append("| " + " | ".join(_cell(c, True) for c in cells) + " |")
    _write_atomically(folder / "results.md", "\n".join(lines) + "\n")


def _shown_path(path: Path) -> str:
    """Relative to the working directory when under it (the repository, normally), else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _run_folder(cli) -> str:
    """The folder a run wrote (its ``report.html``): ``trainer.log_dir``, as ``RunReport`` uses; empty when the run
    left none (it failed before its trainer was built, or before its first checkpoint: the CLI removes its files)."""
    trainer = getattr(cli, "trainer", None)
    if trainer is None:
        return ""
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    return _shown_path(folder) if folder.is_dir() else ""


def sweep_command(path, method: str, count: int | None, seed: int, out, check: str, extra: list[str]) -> str:
    """The command line that runs this sweep again (the same runs; a new table)."""
    parts = ["python", "-m", "lightning_ft.sweep", str(path), "--method", method]
    parts += ["--count", str(count)] if count else []
    parts += ["--seed", str(seed)] if method == "random" else []
    parts += ["--out", str(out)] if out is not None else []
    parts += ["--check", check] if check != "auto" else []
    return shlex.join([*parts, *(["--", *extra] if extra else [])])


def run_sweep(path: str | Path, method: str = "grid", count: int | None = None, out: str | Path | None = None,
              extra: list[str] = (), seed: int = 0, check: str = "auto") -> SweepResult:  # fmt: skip
    """Check every configuration, then run each in turn, rewriting ``<out>/sweep_<N>/results.{csv,md}`` after each.
    A failed run is a row with its error, and the sweep goes on; the caller decides what failures mean (``main``
    exits with status 1)."""
    import torch

    sweep = load_sweep(path)
    metric, goal = sweep["metric"]["name"], sweep["metric"].get("goal", "minimize")
    extra = list(extra)
    runs = expand(sweep, method, count, seed)
    args = [[*cli_args(sweep, values), *extra] for values in runs]
    print(f"lightning-ft sweep: checking {_count(len(runs), 'configuration')} before the first run", flush=True)
    started = time.perf_counter()
    used = check_configurations(args, runs, check)
    seconds = time.perf_counter() - started
    print(f"lightning-ft sweep: {_count(len(runs), 'configuration')} accepted ({seconds:.1f} s)", flush=True)

    folder = new_table_folder(Path(out) if out is not None else Path("runs") / "sweeps" / Path(path).stem)
    swept = list(sweep["parameters"])
    template = cli_args(sweep, {k: f"<{k}>" for k in swept})
    header = {
        "path": str(path), "metric": metric, "goal": goal, "method": method, "swept": swept, "extra": extra,
        "fixed": fixed_overrides(extra),
        "command": sweep_command(path, method, count, seed, out, check, extra),
        # The swept keys' places shown as <key>, unquoted: the line is a template to read, not to paste.
        "run_command": " ".join(
            p if "<" in p else shlex.quote(p) for p in ["python", "-m", "lightning_ft.run", *template, *extra]
        ),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }  # fmt: skip
    rows = [
        {"run": i, "status": "pending", **used[i], metric: float("nan"), "seconds": float("nan"), "run_folder": "",
         "error": "", "command": shlex.join(["python", "-m", "lightning_ft.run", *args[i]])}
        for i in range(len(runs))
    ]  # fmt: skip
    write_table(folder, rows, header)
    print(f"lightning-ft sweep: table {_shown_path(folder / 'results.md')} (rewritten after every run)", flush=True)
    for i, values in enumerate(runs):
        row = rows[i]
        print(f"lightning-ft sweep: run {i} ({i + 1}/{len(runs)}): {_label(used[i])}", flush=True)
        begun = time.perf_counter()
        cli, error = _start_cli(args[i])
        row["seconds"] = round(time.perf_counter() - begun, 1)
        row["run_folder"] = _run_folder(cli)  # an interrupted fit keeps its folder: its last.ckpt resumes it
        if cli is not None:
            row.update({k: used_value(cli, k, v) for k, v in values.items()})
        if isinstance(error, (KeyboardInterrupt, SystemExit)):  # Ctrl-C or a signal: the user stops the sweep
            row.update(status="interrupted", error=first_line(error))
            write_table(folder, rows, header)
            print(f"lightning-ft sweep: interrupted in run {i}; table {_shown_path(folder / 'results.md')}", flush=True)
            raise error
        if error is None:
            value = cli.trainer.callback_metrics.get(metric)
            row.update(status="ok", **{metric: float(value) if isinstance(value, torch.Tensor) else float("nan")})
            outcome = f"{metric} = {row[metric]:.4g}" if isinstance(value, torch.Tensor) else f"no {metric} logged"
        else:
            row.update(status="failed", error=first_line(error))
            outcome = f"FAILED ({row['error']}); the sweep goes on"
        del cli
        gc.collect()
        write_table(folder, rows, header)
        where = row["run_folder"] or "no run folder"
        print(f"lightning-ft sweep: run {i} ({i + 1}/{len(runs)}) -> {outcome} [{where}]", flush=True)
    folders = [r["run_folder"] for r in rows if r["run_folder"]]
    if len(set(folders)) < len(folders):
        print("lightning-ft sweep: note: several runs wrote the same folder (no logger: every run writes into "
              "trainer.default_root_dir), so each keeps only the last run's report", flush=True)  # fmt: skip
    return SweepResult(rows, folder)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The runner's own options (before or after the file) and, after ``--``, the overrides for every run."""
    parser = argparse.ArgumentParser(
        description="Run a W&B sweep file locally (grid or random), one run after another.",
        epilog="Arguments after -- go to every run's training CLI, e.g. -- --trainer.max_steps 60",
    )
    parser.add_argument("sweep")
    parser.add_argument("--method", default=None, help="grid | random (default: the file's method)")
    parser.add_argument("--count", type=int, default=None, help="runs (random: default 10; grid: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    parser.add_argument(
        "--out", default=None, help="folder of this sweep's tables: each invocation adds sweep_<N>/results.{csv,md} "
        "(default runs/sweeps/<file stem>)"
    )  # fmt: skip
    parser.add_argument(
        "--check", default="auto", choices=CHECKS, help="before the first run, build every configuration (build), "
        "or build the first and check the others' settings without loading weights (settings); auto: build while a "
        f"build takes under {BUILD_SECONDS:.0f} s"
    )  # fmt: skip
    # Split at `--` by hand: argparse's REMAINDER after a positional takes the runner's own options too.
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    return parser.parse_args(own), extra


def main(argv: list[str] | None = None) -> SweepResult:
    """The command line; exits with status 1 when a run failed (after the table holds every row)."""
    args, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    method = args.method or load_sweep(args.sweep).get("method", "grid")
    result = run_sweep(args.sweep, method, args.count, args.out, extra, args.seed, args.check)
    table = _shown_path(result.folder / "results.md")
    if result.failed:
        runs = "; ".join(f"run {r['run']}: {r['error']}" for r in result.failed)
        print(f"lightning-ft sweep: {len(result.failed)} of {len(result.rows)} runs FAILED ({runs}); the others' "
              f"results are in {table}", flush=True)  # fmt: skip
        raise SystemExit(1)
    print(f"lightning-ft sweep: {_count(len(result.rows), 'run')} finished; table {table}", flush=True)
    return result


if __name__ == "__main__":
    main()
