"""Hyperparameter sweeps: W&B sweep files, and a local runner for users without a W&B server.

A sweep file (``experiments/sweeps/*.yaml``) is in W&B's format; its ``command`` runs the project's CLI with the swept
keys as overrides, so the same file works with ``wandb sweep FILE`` + ``wandb agent ID`` and with

    python -m lightning_ft.sweep experiments/sweeps/dreambooth_bnn.yaml --method grid [--count N] [--out results] \
        [-- --trainer.max_steps 60 ...]

The local runner expands the file's ``parameters`` (``grid``: every combination of ``values``; ``random``: ``count``
draws, ``values`` uniformly and ``distribution`` ``uniform`` / ``log_uniform_values`` / ``int_uniform`` /
``q_uniform`` as W&B defines them), runs the fits one after the other in this process, reads the sweep's
``metric.name`` from each run's ``callback_metrics`` and writes one table (CSV and markdown), best run first, with
the values each run used (an override after ``--`` included). W&B's
``bayes`` method needs its server; locally it is rejected. Written here because W&B's own local controller needs
a W&B server too.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import random
import sys
from pathlib import Path

import yaml

PLACEHOLDERS = ("${env}", "${interpreter}", "${program}")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform", "q_uniform")


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


def run_sweep(path: str | Path, method: str = "grid", count: int | None = None, out: str | Path | None = None,
              extra: list[str] = (), seed: int = 0) -> list[dict]:  # fmt: skip
    """Run every expanded configuration in turn; write ``<out>.csv`` and ``<out>.md`` (best first)."""
    import torch

    from lightning_ft.run import main

    sweep = load_sweep(path)
    metric, goal = sweep["metric"]["name"], sweep["metric"].get("goal", "minimize")
    rows = []
    for i, values in enumerate(expand(sweep, method, count, seed)):
        cli = main([*cli_args(sweep, values), *extra])
        value = cli.trainer.callback_metrics.get(metric)
        value = float(value) if isinstance(value, torch.Tensor) else float("nan")
        # The values the run used, from its parsed config (what its config.yaml records): an override in `extra`
        # (`-- --trainer.max_steps 60`) wins over the sweep file's value, and the table must say so.
        used = {key: used_value(cli, key, drawn) for key, drawn in values.items()}
        rows.append({"run": i, **used, metric: value})
        print(f"lightning-ft sweep: run {i} {used} -> {metric} = {value:.4g}", flush=True)
    rows.sort(key=lambda r: (math.isnan(r[metric]), r[metric] if goal == "minimize" else -r[metric]))
    out = Path(out or Path("runs") / "sweeps" / Path(path).stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    keys = list(rows[0])
    lines = [f"Sweep `{path}` ({method}, {len(rows)} runs), {metric} ({goal}), best first.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]  # fmt: skip
    lines += [
        "| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows
    ]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    return rows


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
    parser.add_argument("--out", default=None, help="table path without suffix (default runs/sweeps/<file stem>)")
    # Split at `--` by hand: argparse's REMAINDER after a positional takes the runner's own options too.
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    return parser.parse_args(own), extra


def main(argv: list[str] | None = None) -> list[dict]:
    args, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    method = args.method or load_sweep(args.sweep).get("method", "grid")
    return run_sweep(args.sweep, method, args.count, args.out, extra, args.seed)


if __name__ == "__main__":
    main()
