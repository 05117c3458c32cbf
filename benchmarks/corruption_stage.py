"""Does fine-tuning on the embedded subject pass through a corruption stage, and does BNN fine-tuning shrink it?

Three arms, each a baseline and its BNN variant, several seeds each:

- ``released``: ``experiments/dreambooth.yaml`` vs ``experiments/dreambooth_bnn.yaml`` as they are (prior
  preservation with 50 class images, lr 1e-4, 300 steps);
- ``stress``: the same two files without prior preservation (``--data.num_class_images 0``), a higher learning
  rate (``--stress-lr``) and more steps (``--stress-steps``), a setting meant to bring the stage on;
- ``lora``: ``experiments/dreambooth_lora.yaml`` vs ``experiments/dreambooth_lora_bnn.yaml`` as they are.

Each run is the real CLI (``python -m lightning_ft.run fit``) in its own single-threaded process, on a copy of the
experiment file merged with its data config (``configs/data/embedded_subject.yaml``: the subject's images, prompts
and held-out images) written under ``--root``, in which the ``CorruptionStageMonitor`` evaluates every ``--every``
steps with ``--sample-seeds`` fixed sampling seeds and also saves the images it scored (``SampleSavingMonitor``,
below: the monitor unchanged plus one PNG per evaluation); ``ModelCheckpoint`` and ``DiffusersExport`` are
dropped (nothing here reads them) and the ``SampleGridLogger`` is kept. From each run's ``corruption_stage.csv``
(with the class prior and ceiling the monitor measured) the benchmark reads the stage under the monitor's rule and
under the fidelity-only rule (``require_noise=False``), the dip (deepest drop of identity below its running max:
depth, step, and how long each rule flags it), and copies the monitor's samples at the dip and at the end into
``<out>_grids/``. The BNN effect per arm is the mean dip depth of BNN minus the baseline's, with a seeded
percentile bootstrap over seeds.

A run whose log dir already holds its final row (step = max steps) with the same settings is reused, so an
interrupted benchmark continues where it stopped. Before starting, the expected run time of the runs still to do
is printed (calibrated on single-threaded pilot runs; see ``COST``).

To run: python -m benchmarks.corruption_stage --arms released stress lora --seeds 0 1 2
Writes benchmarks/results/corruption_stage.{md,csv,png} and benchmarks/results/corruption_stage_grids/; the runs go
to runs/bench_corruption/.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from benchmarks.fits import SavesSamples, run_fit
from benchmarks.launch import REPO, merged_experiment
from benchmarks.perf import add_device_arguments, device_overrides
from benchmarks.tables import fmt, markdown_table, write_csv
from lightning_ft.callbacks.corruption_monitor import CorruptionStageMonitor
from lightning_ft.report.stage_rules import StageReport, classify_stages

RESULTS = REPO / "benchmarks" / "results"
BASELINES = {"dreambooth": "DreamBooth", "dreambooth_lora": "LoRA"}
BNNS = {"dreambooth_bnn": "DreamBooth-BNN", "dreambooth_lora_bnn": "LoRA-BNN"}
NAMES = {**BASELINES, **BNNS}
ARM_METHODS = {
    "released": ("dreambooth", "dreambooth_bnn"),
    "stress": ("dreambooth", "dreambooth_bnn"),
    "lora": ("dreambooth_lora", "dreambooth_lora_bnn"),
}
MONITOR = "lightning_ft.callbacks.CorruptionStageMonitor"
DROPPED = ("ModelCheckpoint", "DiffusersExport", "FIDMonitor")
# Cost model of one run on one free core, fitted to the CPU time of the pilot runs (300 steps of DreamBooth, 500 and
# 1,000 steps without prior preservation): process start-up with the levels, milliseconds per training step,
# seconds per monitor evaluation (16 samples of one prompt, 25 DDIM steps, guidance 2) and per SampleGridLogger grid
# (16 samples). Wall time is longer when other jobs share the core.
COST = {
    "startup_s": 15.0,
    "step_ms": {("released", False): 120.0, ("released", True): 130.0, ("stress", False): 75.0,
                ("stress", True): 82.0, ("lora", False): 100.0, ("lora", True): 105.0},
    "eval_s": 3.3,
    "grid_s": 3.3,
}  # fmt: skip


class SampleSavingMonitor(SavesSamples, CorruptionStageMonitor):
    """The ``CorruptionStageMonitor`` unchanged, plus the images of every evaluation saved as
    ``<log dir>/monitor_samples/step_XXXXXX.png`` (one row per prompt, one column per sampling seed, actual size):
    the exact samples behind each point of the curves, so a dip can be looked at without sampling again."""


# ------------------------------------------------------------------------------------------- pure functions
def dip_summary(report: StageReport, fidelity: list[float]) -> dict:
    """The dip of one curve as ``classify_stages`` saw it (points in ``report.steps`` order, ``fidelity`` in the
    same order): ``depth`` (largest drop below the running max, ``report.dip_depth``), ``dip_step`` (the first step
    where it is reached; None when the curve never falls), ``peak_step`` (where the running max it is measured from
    was set), and for the rule's first flagged run ``start``, ``end`` and ``duration`` in steps: from its first
    flagged evaluation to the first evaluation after it (to the last step plus one interval when it lasts to the
    end, ``ongoing``); ``flagged_steps`` counts the steps covered by every flagged run the same way."""
    steps, drops = report.steps, report.drops
    finite = [i for i, d in enumerate(drops) if d == d]

    def covered(first: int, last: int) -> int:
        k = steps.index(last)
        after = steps[k + 1] if k + 1 < len(steps) else steps[k] + (steps[k] - steps[k - 1] if k > 0 else 0)
        return after - first

    out = {"depth": report.dip_depth, "dip_step": None, "peak_step": None, "start": None, "end": None,
           "duration": 0, "ongoing": report.corruption_ongoing,
           "flagged_steps": sum(covered(a, b) for a, b in report.intervals)}  # fmt: skip
    if finite and report.dip_depth > 0:
        i = next(i for i in finite if drops[i] == report.dip_depth)
        out["dip_step"] = steps[i]
        peak = max(fidelity[j] for j in finite if j <= i)
        out["peak_step"] = steps[next(j for j in finite if j <= i and fidelity[j] == peak)]
    if report.corruption_detected:
        out["start"], out["end"] = report.corruption_start, report.corruption_end
        out["duration"] = covered(report.corruption_start, report.corruption_end)
    return out


def bootstrap_mean_difference(
    baseline: list[float], treated: list[float], resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """mean(treated) - mean(baseline) and its percentile bootstrap interval: each resample draws both groups anew,
    with replacement and at their own sizes (the runs of the two methods are independent), from a seeded
    generator. Returns (difference, low, high)."""
    a, b = np.asarray(baseline, dtype=float), np.asarray(treated, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("bootstrap_mean_difference: both groups need at least one value")
    rng = np.random.default_rng(seed)
    diffs = b[rng.integers(0, b.size, (resamples, b.size))].mean(1) - a[
        rng.integers(0, a.size, (resamples, a.size))
    ].mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return float(b.mean() - a.mean()), float(low), float(high)


def estimate_seconds(arm: str, bnn: bool, steps: int, every: int, grid_every: int) -> float:
    """Expected wall time of one run on one thread (``COST``)."""
    evals = steps // every + 1 + (steps % every > 0)
    grids = (steps // grid_every if grid_every else 0) + (not grid_every or steps % grid_every > 0)
    return (
        COST["startup_s"] + steps * COST["step_ms"][(arm, bnn)] / 1000 + evals * COST["eval_s"] + grids * COST["grid_s"]
    )


# ------------------------------------------------------------------------------------------------- runs
def bench_config(method: str, every: int, sample_seeds: int, grid_every: int) -> dict:
    """The experiment file merged with its data config (the embedded subject: images, prompts, held-out images),
    with the monitor evaluating every ``every`` steps on ``sample_seeds`` seeds (and saving its samples), the
    sample grid every ``grid_every`` steps, and checkpoints, exports and FID dropped."""
    config = merged_experiment(f"experiments/{method}.yaml")  # the experiment holds no data
    callbacks = []
    for callback in config["trainer"].get("callbacks", []):
        path = callback["class_path"]
        if path.endswith(DROPPED):
            continue
        args = dict(callback.get("init_args") or {})
        if path == MONITOR:
            callback = {"class_path": "benchmarks.corruption_stage.SampleSavingMonitor"}
            args.update(every_n_steps=every, seeds=list(range(sample_seeds)), keep_best_checkpoint=False)
        elif path.endswith("SampleGridLogger"):
            args.update(every_n_steps=grid_every)
        callbacks.append({**callback, "init_args": args})
    if not any(c["class_path"].endswith("SampleSavingMonitor") for c in callbacks):
        raise ValueError(f"experiments/{method}.yaml has no CorruptionStageMonitor to configure")
    config["trainer"]["callbacks"] = callbacks
    config["trainer"]["enable_checkpointing"] = False  # no default ModelCheckpoint either
    return config


def arm_settings(arm: str, args) -> tuple[int, list[str], str]:
    """(steps, CLI overrides, folder name) of an arm."""
    device = device_overrides(args)  # the fits run on --device at --precision; the scoring stays in the monitor
    if arm == "stress":
        extra = ["--data.num_class_images", "0", "--model.lr", str(args.stress_lr), *device]
        return args.stress_steps, extra, f"stress_lr{args.stress_lr:g}_steps{args.stress_steps}_noprior"
    return args.steps, device, f"{arm}_steps{args.steps}"


def finished_log_dir(run_root: Path, steps: int, settings: dict) -> Path | None:
    """The newest log dir under ``run_root`` whose curves reach ``steps`` and whose settings match, else None."""
    saved = run_root / "bench.json"
    if not saved.exists() or json.loads(saved.read_text()).get("settings") != settings:
        return None
    for log_dir in sorted((run_root / "lightning_logs").glob("version_*"), key=lambda p: -p.stat().st_mtime):
        path = log_dir / "corruption_stage.csv"
        if path.exists():
            with open(path) as handle:
                rows = list(csv.DictReader(handle))
            if rows and int(float(rows[-1]["step"])) == steps:
                return log_dir
    return None


def fit(job: dict) -> tuple[Path, float, float]:
    """Run one fit (or reuse a finished one); returns its log dir, its wall time and its CPU time in seconds."""
    return run_fit(job, finished_log_dir, "corruption_stage.csv")


def read_curve(log_dir: Path) -> dict[str, list]:
    with open(log_dir / "corruption_stage.csv") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: float(r["step"]))
    curve = {key: [float(r[key]) for r in rows] for key in rows[0] if key != "stage"}
    curve["step"] = [int(s) for s in curve["step"]]
    curve["stage"] = [r["stage"] for r in rows]
    return curve


def analyse(curve: dict, every: int) -> dict:
    """Both rules on one run's curve, with the levels the monitor measured; the monitor's own stage labels are
    checked against the recomputed ones (corruption or not)."""
    levels = (curve["class_prior"][0], curve["ceiling"][0])
    span = levels[1] - levels[0]
    monitor = classify_stages(curve["step"], curve["fidelity"], curve["score"], levels=levels)
    fidelity_only = classify_stages(
        curve["step"], curve["fidelity"], curve["score"], require_noise=False, levels=levels
    )
    logged = [s == "corruption" for s in curve["stage"]]
    if logged != [s == "corruption" for s in monitor.stages]:
        print(f"warning: the monitor's logged corruption labels differ from the recomputed ones: {curve['stage']}")
    dip, dip_only = dip_summary(monitor, curve["fidelity"]), dip_summary(fidelity_only, curve["fidelity"])
    i = curve["step"].index(dip["dip_step"]) if dip["dip_step"] is not None else None
    return {
        "class_prior": levels[0], "ceiling": levels[1],
        "verdict": curve["stage"][-1],
        "stage_monitor": f"{dip['start']}-{dip['end']}" if monitor.corruption_detected else "none",
        "stage_monitor_steps": dip["duration"], "stage_monitor_ongoing": dip["ongoing"],
        "stage_fidelity_only": f"{dip_only['start']}-{dip_only['end']}" if dip_only["start"] is not None else "none",
        "stage_fidelity_only_steps": dip_only["duration"], "stage_fidelity_only_ongoing": dip_only["ongoing"],
        "flagged_steps_fidelity_only": dip_only["flagged_steps"],
        "dip_depth": dip["depth"], "dip_depth_progress": dip["depth"] / span,
        "dip_threshold": monitor.thresholds[i] if i is not None else float("nan"),
        "dip_step": dip["dip_step"], "dip_from_step": dip["peak_step"],
        "score_at_dip": curve["score"][i] if i is not None else float("nan"),
        "peak_progress": max(curve["progress"]), "final_progress": curve["progress"][-1],
        "peak_fidelity": max(curve["fidelity"]), "final_fidelity": curve["fidelity"][-1],
        "max_score": max(curve["score"]), "final_score": curve["score"][-1],
        "final_memorisation": curve["memorisation"][-1],
    }  # fmt: skip


def wrap_strip(image, columns: int):
    """A one-row strip of square tiles (the monitor's grid of one prompt) rewrapped into rows of ``columns``."""
    from PIL import Image

    side = image.height
    count = image.width // side
    if count <= columns:
        return image
    rows = -(-count // columns)
    out = Image.new(image.mode, (columns * side, rows * side))
    for k in range(count):
        tile = image.crop((k * side, 0, (k + 1) * side, side))
        out.paste(tile, ((k % columns) * side, (k // columns) * side))
    return out


def copy_grids(log_dir: Path, row: dict, folder: Path, stem: str, upscale: int = 2) -> dict[str, str]:
    """The monitor's samples at the dip (when the curve falls at all) and at the end, enlarged, into ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    picks = {"end": row["final_step"]}
    if row["dip_step"] is not None:
        picks["dip"] = row["dip_step"]
    written = {}
    for tag, step in picks.items():
        source = log_dir / "monitor_samples" / f"step_{int(step):06d}.png"
        if source.exists():
            image = Image.open(source).convert("RGB")
            image = wrap_strip(image, 8) if image.width // image.height > 8 else image
            target = folder / f"{stem}_{tag}.png"
            image.resize((image.width * upscale, image.height * upscale), Image.NEAREST).save(target, optimize=True)
            written[tag] = str(target.relative_to(REPO) if target.is_relative_to(REPO) else target)
    return written


# ----------------------------------------------------------------------------------------------- output
def arm_summaries(rows: list[dict], args) -> list[dict]:
    summaries = []
    for arm in args.arms:
        base, bnn = ARM_METHODS[arm]
        a = [r for r in rows if r["arm"] == arm and r["method_key"] == base]
        b = [r for r in rows if r["arm"] == arm and r["method_key"] == bnn]
        if not a or not b:
            continue
        entry = {"arm": arm, "seeds": len(a)}
        for key in ("dip_depth", "dip_depth_progress"):
            diff, low, high = bootstrap_mean_difference([r[key] for r in a], [r[key] for r in b], args.resamples, 0)
            entry.update({f"{key}_baseline": float(np.mean([r[key] for r in a])),
                          f"{key}_bnn": float(np.mean([r[key] for r in b])),
                          f"{key}_diff": diff, f"{key}_ci_low": low, f"{key}_ci_high": high})  # fmt: skip
        for tag, group in (("baseline", a), ("bnn", b)):
            entry[f"stage_monitor_{tag}"] = f"{sum(r['stage_monitor'] != 'none' for r in group)}/{len(group)}"
            entry[f"stage_fidelity_only_{tag}"] = (
                f"{sum(r['stage_fidelity_only'] != 'none' for r in group)}/{len(group)}"
            )
            entry[f"final_progress_{tag}"] = float(np.mean([r["final_progress"] for r in group]))
        entry["baseline"], entry["bnn"] = NAMES[base], NAMES[bnn]
        summaries.append(entry)
    return summaries


def write_outputs(rows: list[dict], curves: dict, summaries: list[dict], out: Path, args, wall: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, f"{out}.csv")
    write_csv(summaries, f"{out}_summary.csv")
    columns = ["arm", "method", "seed", "steps", "verdict", "stage (monitor rule)", "steps flagged (monitor)",
               "dip (fidelity-only rule)", "steps flagged (fidelity-only)", "dip depth", "dip depth / span",
               "threshold at dip", "dip step", "from step", "score at dip", "peak progress", "final progress",
               "max score", "fit s", "fit CPU s"]  # fmt: skip
    table = [{
        "arm": r["arm"], "method": r["method"], "seed": r["seed"], "steps": r["final_step"], "verdict": r["verdict"],
        "stage (monitor rule)": r["stage_monitor"] + (" (ongoing)" if r["stage_monitor_ongoing"] else ""),
        "steps flagged (monitor)": r["stage_monitor_steps"],
        "dip (fidelity-only rule)": r["stage_fidelity_only"]
        + (" (ongoing)" if r["stage_fidelity_only_ongoing"] else ""),
        "steps flagged (fidelity-only)": r["stage_fidelity_only_steps"],
        "dip depth": fmt(r["dip_depth"]), "dip depth / span": fmt(r["dip_depth_progress"]),
        "threshold at dip": fmt(r["dip_threshold"]), "dip step": fmt(r["dip_step"]),
        "from step": fmt(r["dip_from_step"]),
        "score at dip": fmt(r["score_at_dip"], 2), "peak progress": fmt(r["peak_progress"], 2),
        "final progress": fmt(r["final_progress"], 2), "max score": fmt(r["max_score"], 2),
        "fit s": fmt(r["fit_seconds"], 0), "fit CPU s": fmt(r["fit_cpu_seconds"], 0),
    } for r in rows]  # fmt: skip
    summary_columns = ["arm", "baseline", "bnn", "seeds", "stage (monitor rule)", "dip (fidelity-only rule)",
                       "mean dip depth baseline", "mean dip depth BNN", "BNN - baseline [95% CI]",
                       "same in span units [95% CI]", "final progress baseline", "final progress BNN"]  # fmt: skip
    summary_table = [{
        "arm": s["arm"], "baseline": s["baseline"], "bnn": s["bnn"], "seeds": s["seeds"],
        "stage (monitor rule)": f"{s['stage_monitor_baseline']} vs {s['stage_monitor_bnn']}",
        "dip (fidelity-only rule)": f"{s['stage_fidelity_only_baseline']} vs {s['stage_fidelity_only_bnn']}",
        "mean dip depth baseline": fmt(s["dip_depth_baseline"]), "mean dip depth BNN": fmt(s["dip_depth_bnn"]),
        "BNN - baseline [95% CI]": f"{s['dip_depth_diff']:+.3f} [{s['dip_depth_ci_low']:+.3f}, "
                                   f"{s['dip_depth_ci_high']:+.3f}]",
        "same in span units [95% CI]": f"{s['dip_depth_progress_diff']:+.3f} [{s['dip_depth_progress_ci_low']:+.3f}, "
                                       f"{s['dip_depth_progress_ci_high']:+.3f}]",
        "final progress baseline": fmt(s["final_progress_baseline"], 2),
        "final progress BNN": fmt(s["final_progress_bnn"], 2),
    } for s in summaries]  # fmt: skip
    arms = ", ".join(f"{arm}: {arm_settings(arm, args)[2]}" for arm in args.arms)

    def total(key: str) -> float:
        return sum(r[key] for r in rows if r[key] == r[key])

    timed = sum(r["fit_cpu_seconds"] == r["fit_cpu_seconds"] for r in rows)
    cpu_note = f"{total('fit_cpu_seconds') / 60:.1f} min of CPU time" + (
        f" (recorded for {timed} of {len(rows)} fits)" if timed < len(rows) else ""
    )
    if not timed:
        cpu_note = "no recorded CPU time (runs from before the benchmark kept it)"
    ran = sum(not job_reused for job_reused in args.reused)

    notes = [
        f"Command: `python -m benchmarks.corruption_stage {' '.join(args.argv)}`; wall time of this invocation "
        f"{wall / 60:.1f} min ({ran} fits run, {len(rows) - ran} reused); the fits took "
        f"{total('fit_seconds') / 60:.1f} min of wall time (each fit's own, also for runs reused from an earlier "
        f"invocation) and {cpu_note}, {args.jobs} training process(es) at a time, one thread each.",
        f"Arms ({arms}); seeds {args.seeds} (seed_everything and data seed); the CorruptionStageMonitor evaluates "
        f"at step 0, every {args.every} steps and at the end, on the instance prompts (the training captions, "
        f"pooled) with {args.sample_seeds} fixed sampling seeds (25 DDIM steps, guidance 2).",
        "Identity = the monitor's fidelity (cosine of the identity embeddings of the backbone the model declares, "
        "the embedded world's `shapes-identity-v5`, to the 5 instance images); class prior and ceiling = the levels "
        "the monitor measured at the start of each fit; "
        "span = ceiling - class prior; progress = (identity - prior) / span.",
        "Dip depth = the largest drop of identity below its running max (any step, flagged or not); threshold = "
        "max(0.1 x span, 0.3 x rise so far) at the dip. Monitor rule: dip beyond the threshold AND corruption score "
        "(high-frequency energy of the samples / of the instance images) > 1.5. Fidelity-only rule: the dip alone. "
        "Steps flagged: from the first flagged evaluation of the first stage to the next evaluation.",
        f"BNN effect: mean dip depth of BNN minus the baseline's, percentile bootstrap 95% CI ({args.resamples} "
        f"resamples, numpy seed 0, the two groups resampled independently) over {len(args.seeds)} seeds per "
        "method: with so few seeds the interval is coarse.",
        f"Grids: `{Path(args.out).name}_grids/<arm>_<method>_seed<k>_{{dip,end}}.png`, the monitor's own samples "
        f"(one row per prompt, {args.sample_seeds} seeds) at the deepest point of the dip and at the last step.",
    ]
    if not any(r["fit_cpu_seconds"] == r["fit_cpu_seconds"] for r in rows):  # runs from before CPU time was kept
        columns.remove("fit CPU s")
    levels = sorted({(round(r["class_prior"], 3), round(r["ceiling"], 3)) for r in rows})
    notes.insert(2, f"Levels measured by the monitor (class prior, ceiling), over all runs: {levels}.")
    lines = ["# Corruption stage: baseline vs BNN, three arms", "", *markdown_table(summary_table, summary_columns),
             "", *markdown_table(table, columns), "", *notes]  # fmt: skip
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(curves, rows, Path(f"{out}.png"), args)


def plot(curves: dict, rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in args.arms if any(r["arm"] == a for r in rows)]
    figure, axes = plt.subplots(2, len(arms), figsize=(5.2 * len(arms), 7), squeeze=False)
    styles = ["-", "--", ":", "-."]
    try:
        for col, arm in enumerate(arms):
            top, bottom = axes[0, col], axes[1, col]
            base, bnn = ARM_METHODS[arm]
            for r in (r for r in rows if r["arm"] == arm):
                curve = curves[(arm, r["method_key"], r["seed"])]
                colour = "C0" if r["method_key"] == base else "C3"
                style = styles[args.seeds.index(r["seed"]) % len(styles)]
                label = f"{r['method']} seed {r['seed']}"
                top.plot(curve["step"], curve["fidelity"], style, color=colour, alpha=0.85, label=label)
                bottom.plot(curve["step"], curve["score"], style, color=colour, alpha=0.85, label=label)
                if r["dip_step"] is not None:
                    i = curve["step"].index(r["dip_step"])
                    top.plot([r["dip_step"]], [curve["fidelity"][i]], "v", color=colour, markersize=6)
            first = next(r for r in rows if r["arm"] == arm)
            top.axhline(first["class_prior"], color="grey", linestyle="--", linewidth=1)
            top.axhline(first["ceiling"], color="black", linestyle="--", linewidth=1)
            top.text(0, first["class_prior"], " class prior", va="bottom", fontsize=8, color="grey")
            top.text(0, first["ceiling"], " ceiling", va="top", fontsize=8)
            bottom.axhline(1.5, color="black", linestyle="--", linewidth=1)
            bottom.text(0, 1.5, " noise threshold 1.5", va="bottom", fontsize=8)
            top.set_title(f"{arm}: identity (v = deepest dip)")
            bottom.set_title(f"{arm}: corruption score (HF energy ratio)")
            for axis in (top, bottom):
                axis.set_xlabel("step")
            top.set_ylim(0, 1)
            top.legend(fontsize=7, loc="lower right")
        figure.tight_layout()
        figure.savefig(path, dpi=80)
    finally:
        plt.close(figure)


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARM_METHODS), default=["released", "stress", "lora"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="steps of the released and lora arms")
    parser.add_argument("--stress-steps", type=int, default=1000)
    parser.add_argument("--stress-lr", type=float, default=5e-4)
    parser.add_argument("--every", type=int, default=25, help="monitor evaluation period (steps)")
    parser.add_argument("--sample-seeds", type=int, default=16, help="sampling seeds 0..N-1 of the monitor")
    parser.add_argument("--grid-every", type=int, default=0, help="SampleGridLogger period (default 0 = end only)")
    parser.add_argument("--methods", nargs="+", choices=list(NAMES), help="only these methods (pilots)")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=1, help="fits at a time (1 = one core)")
    add_device_arguments(parser)
    parser.add_argument("--root", default=str(REPO / "runs" / "bench_corruption"))
    parser.add_argument("--out", default=str(RESULTS / "corruption_stage"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate only")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    root = Path(args.root).resolve()

    jobs = []
    for arm in args.arms:
        steps, extra, folder = arm_settings(arm, args)
        for method in ARM_METHODS[arm]:
            if args.methods and method not in args.methods:
                continue
            config_path = (
                root / "configs" / f"{method}_every{args.every}_seeds{args.sample_seeds}_grid{args.grid_every}.yaml"
            )
            config = bench_config(method, args.every, args.sample_seeds, args.grid_every)
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            for seed in args.seeds:
                run_root = root / folder / method / f"seed{seed}"
                settings = {"config": config, "steps": steps, "extra": extra, "seed": seed}
                jobs.append({"arm": arm, "method": method, "seed": seed, "steps": steps, "extra": extra,
                             "config": config_path, "root": run_root, "settings": settings,
                             "todo": finished_log_dir(run_root, steps, settings) is None})  # fmt: skip
    todo = [j for j in jobs if j["todo"]]
    args.reused = [not j["todo"] for j in jobs]
    expected = sum(
        estimate_seconds(j["arm"], j["method"] in BNNS, j["steps"], args.every, args.grid_every) for j in todo
    )
    print(f"corruption_stage: {len(jobs)} runs ({len(jobs) - len(todo)} finished, reused; {len(todo)} to run, "
          f"{args.jobs} at a time); expected run time {expected / 60 / args.jobs:.0f} min "
          f"({expected / 60:.0f} min of single-thread fits)", flush=True)  # fmt: skip
    for j in todo:
        print(
            f"  to run: {j['root'].relative_to(root)} ({j['steps']} steps, "
            f"~{estimate_seconds(j['arm'], j['method'] in BNNS, j['steps'], args.every, args.grid_every):.0f} s)"
        )
    if args.dry_run:
        return []

    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(fit, jobs))
    wall = time.perf_counter() - start

    rows, curves = [], {}
    out = Path(args.out).resolve()
    for job, (log_dir, seconds, cpu_seconds) in zip(jobs, results):
        curve = read_curve(log_dir)
        curves[(job["arm"], job["method"], job["seed"])] = curve
        row = {"arm": job["arm"], "method": NAMES[job["method"]], "method_key": job["method"], "seed": job["seed"],
               "final_step": curve["step"][-1], **analyse(curve, args.every), "fit_seconds": seconds,
               "fit_cpu_seconds": cpu_seconds,
               "log_dir": str(log_dir.relative_to(REPO) if log_dir.is_relative_to(REPO) else log_dir)}  # fmt: skip
        grids = copy_grids(log_dir, row, Path(f"{out}_grids"), f"{job['arm']}_{job['method']}_seed{job['seed']}")
        row.update({f"grid_{k}": v for k, v in grids.items()})
        rows.append(row)
    summaries = arm_summaries(rows, args)
    write_outputs(rows, curves, summaries, out, args, wall)
    print(f"corruption_stage: wall time {wall / 60:.1f} min (expected {expected / 60 / args.jobs:.0f} min)")
    return rows


if __name__ == "__main__":
    main()
