"""Diff-Tuning's second experiment on the embedded world: does Diff-Tuning speed up a ControlNet's convergence?

The Diff-Tuning paper (arXiv 2406.00773) reports that it "enhances the convergence speed of ControlNet by 24%",
measured (inferred from its text) on the step of ControlNet's "sudden convergence", when the samples start to follow
the control. Here: plain ControlNet training (``experiments/controlnet.yaml``) vs ControlNet with Diff-Tuning
(``experiments/controlnet_diff_tuning.yaml``, same lr, batch and steps) on the embedded control task
(``configs/data/embedded_control.yaml``: 48 renders with their silhouettes as controls), ``--seeds`` seeds each
(seed_everything and data seed 0, 1, ...).

Each run is the real CLI (``python -m lightning_ft.run fit``) in its own single-threaded process, on a copy of the
experiment merged with its data config written under ``--root``, in which the ControlAdherenceMonitor evaluates at
step 0, every ``--every`` steps and at the end on the 32 held-out pairs (fixed seeds 0-31, the experiment's
sampler settings: 10 DDIM steps, guidance 2) and also saves the images it scored (``SampleSavingControlMonitor``);
checkpoints, the export and the sample grids are dropped (nothing here reads them). From each run's
``control_adherence.csv`` the benchmark reads the curve, the convergence step (the monitor's rule: the first
evaluation from which the mean IoU stays at or above the threshold; its resolution is ``--every`` steps) and the final
IoU.

Reference levels, measured once in this process on the same 32 pairs and seeds: the renders themselves (the
score's ceiling), the renders against another pair's control (chance overlap), the autoencoder round trips of the
renders (what a perfect sample can score), and the pretrained model without a ControlNet sampling the captions with
the monitor's seeds and sampler steps ("no training"; a fresh ControlNet's zero convolutions give the same samples,
so step 0 of every run measures it again).

Per method: the mean convergence step over the runs that converged, with a 95% Student-t interval over seeds; the
mean final IoU with its t-interval; the speed-up = 1 - mean step (Diff-Tuning) / mean step (plain), with a seeded
percentile bootstrap interval (the two groups resampled independently; coarse at 3 seeds). A run that never
converges is counted and left out of the mean step (its step is only known to be > the last step).

A run whose log dir already holds its final row with the same settings is reused, so an interrupted benchmark
continues where it stopped. The expected run time of the runs still to do is printed first (``COST``).

To run: python -m benchmarks.controlnet [--seeds 3] [--steps N] [--jobs 2]
Writes benchmarks/results/controlnet.{md,csv,png}, controlnet_summary.csv, controlnet_steps.csv and
controlnet_grid.png; the runs go to runs/bench_controlnet/.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from benchmarks.fits import SavesSamples, run_fit, t_interval
from benchmarks.launch import REPO, merged_experiment
from benchmarks.tables import fmt, markdown_table, write_csv
from lightning_ft.callbacks.control_monitor import ControlAdherenceMonitor, convergence_step
from lightning_ft.callbacks.sample_grid import save_grid

RESULTS = REPO / "benchmarks" / "results"
METHODS = {"controlnet": "ControlNet", "controlnet_diff_tuning": "ControlNet + Diff-Tuning"}
BASELINE, TREATED = "controlnet", "controlnet_diff_tuning"
MONITOR = "ControlAdherenceMonitor"
DROPPED = ("ModelCheckpoint", "DiffusersExport", "SampleGridLogger")
PAPER_SPEEDUP = 0.24
# Cost model of one run on one free core, measured on the pilot runs (2-core Xeon, one thread per run, the other
# core busy with a second run): process start-up with the monitor's ceiling, seconds per training step at batch 16
# (ControlNet forward and backward beside the frozen UNet; Diff-Tuning's batch is the same size), seconds per monitor
# evaluation (32 samples, 10 DDIM steps, guidance 2, through the ControlNet), and Diff-Tuning's memory bank (256
# samples, drawn once and cached for every later run). Wall time is longer on a busier machine.
COST = {"startup_s": 20.0, "step_s": {"controlnet": 0.25, "controlnet_diff_tuning": 0.25}, "eval_s": 3.5,
        "memory_bank_s": 30.0}  # fmt: skip


class SampleSavingControlMonitor(SavesSamples, ControlAdherenceMonitor):
    """The ``ControlAdherenceMonitor`` unchanged, plus the images of every evaluation saved as
    ``<log dir>/control_samples/step_XXXXXX.png`` (one row, the pairs in order, actual size): the exact samples
    behind each point of the curve, for the grid at convergence."""

    samples_folder = "control_samples"

    def sample_columns(self, images) -> int:
        return len(images)


# ------------------------------------------------------------------------------------------- pure functions
def speedup(baseline: list[float], treated: list[float], resamples: int = 10_000, seed: int = 0,
            level: float = 0.95) -> tuple[float, float, float]:  # fmt: skip
    """1 - mean(treated) / mean(baseline) (the share of the baseline's steps saved; > 0: the treated method
    converges sooner) and its percentile bootstrap interval, both groups resampled independently with replacement
    at their own sizes from a seeded generator. NaNs when a group is empty."""
    a, b = np.asarray(baseline, dtype=float), np.asarray(treated, dtype=float)
    if a.size == 0 or b.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    treated_means = b[rng.integers(0, b.size, (resamples, b.size))].mean(1)
    ratios = treated_means / a[rng.integers(0, a.size, (resamples, a.size))].mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(1 - ratios, [tail, 1 - tail])
    return float(1 - b.mean() / a.mean()), float(low), float(high)


def permutation_p(baseline: list[float], treated: list[float]) -> float:
    """Two-sided exact permutation p-value of the difference of means: the share of all splits of the pooled values
    into groups of the two sizes whose |difference| is at least the observed one (20 splits for 3 + 3 runs, so the
    smallest possible p is 0.1)."""
    from itertools import combinations

    pooled, k = [*baseline, *treated], len(baseline)
    if not baseline or not treated:
        return math.nan
    observed = abs(statistics.fmean(treated) - statistics.fmean(baseline))
    splits = list(combinations(range(len(pooled)), k))
    extreme = 0
    for chosen in splits:
        a = [pooled[i] for i in chosen]
        b = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        extreme += abs(statistics.fmean(b) - statistics.fmean(a)) >= observed - 1e-9
    return extreme / len(splits)


def estimate_seconds(method: str, steps: int, every: int) -> float:
    """Expected wall time of one run on one thread (``COST``), without the memory bank."""
    evals = steps // every + 1 + (steps % every > 0)
    return COST["startup_s"] + steps * COST["step_s"][method] + evals * COST["eval_s"]


def read_curve(log_dir: Path) -> dict[str, list]:
    """The monitor's CSV as columns (sorted by step)."""
    with open(log_dir / "control_adherence.csv") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: int(r["step"]))
    keys = ("iou", "iou_low", "iou_high", "ceiling", "threshold")
    curve = {key: [float(r[key]) if r[key] != "" else math.nan for r in rows] for key in keys}
    curve["step"] = [int(r["step"]) for r in rows]
    return curve


def analyse(curve: dict, threshold: float) -> dict:
    """One run's convergence step (the monitor's rule), its IoU at step 0, at convergence and at the end."""
    step = convergence_step(curve["step"], curve["iou"], threshold)
    at = curve["iou"][curve["step"].index(step)] if step is not None else math.nan
    return {"convergence_step": step, "iou_at_convergence": at, "step0_iou": curve["iou"][0],
            "final_iou": curve["iou"][-1], "final_iou_low": curve["iou_low"][-1],
            "final_iou_high": curve["iou_high"][-1], "ceiling": curve["ceiling"][0], "final_step": curve["step"][-1],
            "peak_iou": max(curve["iou"])}  # fmt: skip


# ------------------------------------------------------------------------------------------------- runs
def bench_config(method: str, every: int, threshold: float) -> dict:
    """The experiment merged with its data config (the embedded control task), with the monitor evaluating every
    ``every`` steps at ``threshold`` and saving its samples; checkpoints, the export and the grids dropped."""
    experiment = f"experiments/{method}.yaml"
    config = merged_experiment(experiment)
    callbacks = []
    for callback in config["trainer"].get("callbacks", []):
        path = callback["class_path"]
        if path.endswith(DROPPED):
            continue
        if path.endswith(MONITOR):
            args = {**(callback.get("init_args") or {}), "every_n_steps": every, "threshold": threshold}
            callback = {"class_path": "benchmarks.controlnet.SampleSavingControlMonitor", "init_args": args}
        callbacks.append(callback)
    if not any(c["class_path"].endswith("SampleSavingControlMonitor") for c in callbacks):
        raise ValueError(f"{experiment} has no ControlAdherenceMonitor to configure")
    config["trainer"]["callbacks"] = callbacks
    config["trainer"]["enable_checkpointing"] = False  # no default ModelCheckpoint either
    return config


def finished_log_dir(run_root: Path, steps: int, settings: dict) -> Path | None:
    """The newest log dir under ``run_root`` whose curve reaches ``steps`` and whose settings match, else None."""
    saved = run_root / "bench.json"
    if not saved.exists() or json.loads(saved.read_text()).get("settings") != settings:
        return None
    for log_dir in sorted((run_root / "lightning_logs").glob("version_*"), key=lambda p: -p.stat().st_mtime):
        if (log_dir / "control_adherence.csv").exists() and read_curve(log_dir)["step"][-1:] == [steps]:
            return log_dir
    return None


def fit(job: dict) -> tuple[Path, float, float]:
    """Run one fit (or reuse a finished one); returns its log dir, its wall time and its CPU time in seconds."""
    return run_fit(job, finished_log_dir, "control_adherence.csv")


# ------------------------------------------------------------------------------------------------ levels
def reference_levels(pairs: int, sample_steps: int, root: Path) -> dict:
    """IoU levels on the monitor's held-out pairs and seeds (cached in ``root/levels.json``): renders, renders with
    another pair's control, autoencoder round trips, and the pretrained model without a ControlNet."""
    cached = root / "levels.json"
    if cached.exists() and json.loads(cached.read_text()).get("settings") == [pairs, sample_steps]:
        return json.loads(cached.read_text())
    import torch

    from lightning_ft.callbacks.control_monitor import read_pairs
    from lightning_ft.embedded import asset_path
    from lightning_ft.embedded.targets import ensure_target
    from lightning_ft.methods import DreamBooth
    from lightning_ft.metrics.control_adherence import control_iou

    rows = read_pairs(ensure_target("control") / "heldout" / "captions.jsonl", pairs, "benchmarks.controlnet")
    images = ControlAdherenceMonitor._pixels([r["file"] for r in rows], 32)
    controls = ControlAdherenceMonitor._pixels([r["conditioning_image"] for r in rows], 32)
    backgrounds = [r["background"] for r in rows]
    model = DreamBooth(pretrained=str(asset_path("shapes-t2i")), guidance_scale=2.0, sample_steps=25).eval()
    with torch.random.fork_rng(devices=[]):
        samples = model.generate(prompts=[r["caption"] for r in rows], seeds=list(range(pairs)), steps=sample_steps)
    scores = {
        "renders": control_iou(images, controls, backgrounds),
        "renders_other_control": control_iou(images, controls.roll(1, 0), backgrounds),
        "round_trip": control_iou(model.round_trip(images), controls, backgrounds),
        "pretrained": control_iou(samples, controls, backgrounds),
    }
    levels = {"pairs": pairs, "settings": [pairs, sample_steps], **{k: float(v.mean()) for k, v in scores.items()}}
    root.mkdir(parents=True, exist_ok=True)
    save_grid(samples, root / "pretrained_samples.png", columns=pairs, upscale=1)
    cached.write_text(json.dumps(levels, indent=1))
    return levels


# ----------------------------------------------------------------------------------------------- output
def fmt_ci(mean: float, half: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if not math.isfinite(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for key, name in METHODS.items():
        group = [r for r in rows if r["method_key"] == key]
        if not group:
            continue
        steps = [r["convergence_step"] for r in group if r["convergence_step"] is not None]
        step_mean, step_half, _ = t_interval(steps)
        final_mean, final_half, _ = t_interval([r["final_iou"] for r in group])
        step0_mean, step0_half, _ = t_interval([r["step0_iou"] for r in group])
        out.append({"method": name, "method_key": key, "seeds": len(group), "converged": len(steps),
                    "convergence_step_mean": step_mean, "convergence_step_ci": step_half,
                    "final_iou_mean": final_mean, "final_iou_ci": final_half, "step0_iou_mean": step0_mean,
                    "step0_iou_ci": step0_half,
                    "fit_seconds_mean": statistics.fmean(r["fit_seconds"] for r in group)})  # fmt: skip
    return out


def per_step_table(rows: list[dict], curves: dict) -> list[dict]:
    """Mean IoU over seeds at every evaluated step, one column per method."""
    steps = sorted({s for curve in curves.values() for s in curve["step"]})
    table = []
    for step in steps:
        entry = {"step": step}
        for key, name in METHODS.items():
            runs = [curves[(r["method_key"], r["seed"])] for r in rows if r["method_key"] == key]
            values = [curve["iou"][curve["step"].index(step)] for curve in runs if step in curve["step"]]
            mean, half, n = t_interval(values)
            entry[name] = fmt_ci(mean, half) if n else "-"
            entry[f"{key}_mean"], entry[f"{key}_ci"], entry[f"{key}_n"] = mean, half, n
        table.append(entry)
    return table


def plot(rows: list[dict], curves: dict, levels: dict, threshold: float, path: Path) -> None:
    """Every run's curve (o = its convergence step) with the reference levels and the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.8))
    styles = ["-", "--", ":", "-."]
    try:
        seeds = sorted({r["seed"] for r in rows})
        for r in rows:
            curve = curves[(r["method_key"], r["seed"])]
            colour = "C0" if r["method_key"] == BASELINE else "C3"
            axis.plot(curve["step"], curve["iou"], styles[seeds.index(r["seed"]) % len(styles)], color=colour,
                      alpha=0.85, label=f"{r['method']} seed {r['seed']}")  # fmt: skip
            if r["convergence_step"] is not None:
                axis.plot([r["convergence_step"]], [r["iou_at_convergence"]], "o", color=colour, markersize=6)
        references = (("renders", levels["renders"], "black"),
                      ("autoencoder round trips", levels["round_trip"], "dimgray"),
                      ("pretrained, no ControlNet", levels["pretrained"], "grey"),
                      ("renders, another pair's control", levels["renders_other_control"], "silver"))  # fmt: skip
        for k, (name, value, colour) in enumerate(references):
            axis.axhline(value, color=colour, linestyle="--", linewidth=1)
            axis.text(0, value, f" {name} {value:.2f}", va="top" if k % 2 else "bottom", fontsize=7, color=colour)
        axis.axhline(threshold, color="green", linestyle=":", linewidth=1)
        axis.text(0, threshold, f" threshold {threshold:.2f}", va="bottom", fontsize=7, color="green")
        axis.set_xlabel("step")
        axis.set_ylabel(f"mean control IoU ({levels['pairs']} held-out pairs)")
        axis.set_ylim(0, 1.05)
        axis.set_title("control adherence over training (o = convergence step)")
        axis.legend(fontsize=7, loc="lower right")
        figure.tight_layout()
        figure.savefig(path, dpi=90)
    finally:
        plt.close(figure)


def convergence_grid(rows: list[dict], pairs: int, path: Path, columns: int = 8) -> str:
    """Control | prompt | sample: the first ``columns`` held-out controls (top row, the prompt above each), then for
    each method its first seed's monitor samples at its convergence step (the last step if it never converged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from lightning_ft.callbacks.control_monitor import read_pairs
    from lightning_ft.embedded.targets import ensure_target

    pair_rows = read_pairs(ensure_target("control") / "heldout" / "captions.jsonl", pairs, "benchmarks.controlnet")
    first = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        first.setdefault(r["method_key"], r)
    picks = []
    for key, r in first.items():
        step = r["convergence_step"] if r["convergence_step"] is not None else r["final_step"]
        tag = "converged" if r["convergence_step"] is not None else "not converged, last"
        picks.append((f"{METHODS[key]}\nseed {r['seed']}, step {step}\n({tag})", Path(r["log_dir_abs"]) /
                      "control_samples" / f"step_{int(step):06d}.png"))  # fmt: skip
        picks.append((f"{METHODS[key]}\nseed {r['seed']}, step 0", Path(r["log_dir_abs"]) / "control_samples" /
                      "step_000000.png"))  # fmt: skip
    figure, axes = plt.subplots(1 + len(picks), columns, figsize=(1.45 * columns + 1.6, 1.6 * (1 + len(picks))),
                                squeeze=False)  # fmt: skip
    try:
        for j in range(columns):
            control = Image.open(pair_rows[j]["conditioning_image"]).convert("RGB")
            axes[0, j].imshow(control, interpolation="nearest")
            words = str(pair_rows[j]["caption"]).replace(" on a ", "\non a ")
            axes[0, j].set_title(words, fontsize=6)
            for i, (_, file) in enumerate(picks, 1):
                strip = Image.open(file).convert("RGB")
                side = strip.height
                axes[i, j].imshow(strip.crop((j * side, 0, (j + 1) * side, side)), interpolation="nearest")
        axes[0, 0].set_ylabel("control", fontsize=7)
        for i, (label, _) in enumerate(picks, 1):
            axes[i, 0].set_ylabel(label, fontsize=6)
        for axis in axes.flat:
            axis.set_xticks([])
            axis.set_yticks([])
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def invocation_note(record: dict) -> str:
    """What the invocation that ran the fits took: wall time, the expected time printed first, the load."""
    load = record.get("load") or []
    busy = (f"5-minute load average {load[0]:.1f} at its start, {load[-1]:.1f} at its end" if len(load) == 2
            else "load average not recorded")  # fmt: skip
    command = " ".join(record.get("command", []))
    return (f"the invocation that ran its {record['ran']} fits (`{command}`) took {record['wall'] / 60:.1f} min of "
            f"wall time (expected {record['expected'] / 60:.0f} min; {busy})")  # fmt: skip


def write_outputs(rows, curves, summaries, levels, out: Path, args, wall: float, expected: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv([{k: v for k, v in r.items() if k != "log_dir_abs"} for r in rows], f"{out}.csv")
    write_csv(summaries, f"{out}_summary.csv")
    steps = per_step_table(rows, curves)
    write_csv([{k: v for k, v in s.items() if k not in METHODS.values()} for s in steps], f"{out}_steps.csv")
    plot(rows, curves, levels, args.threshold, Path(f"{out}.png"))
    grid = convergence_grid(rows, args.pairs, Path(f"{out}_grid.png"))
    steps_of = {key: [r["convergence_step"] for r in rows if r["method_key"] == key and r["convergence_step"]
                      is not None] for key in METHODS}  # fmt: skip
    gain, low, high = speedup(steps_of[BASELINE], steps_of[TREATED], args.resamples)
    p_value = permutation_p(steps_of[BASELINE], steps_of[TREATED])
    by_seed = {(r["method_key"], r["seed"]): r["convergence_step"] for r in rows}
    paired = [by_seed[(BASELINE, s)] - by_seed[(TREATED, s)] for s in args.seed_list
              if by_seed.get((BASELINE, s)) is not None and by_seed.get((TREATED, s)) is not None]  # fmt: skip
    paired_mean, paired_half, paired_n = t_interval(paired)

    summary_table = [{
        "method": s["method"], "runs converged": f"{s['converged']}/{s['seeds']}",
        "convergence step (mean ± 95% t)": fmt_ci(s["convergence_step_mean"], s["convergence_step_ci"], 0),
        "IoU at step 0": fmt_ci(s["step0_iou_mean"], s["step0_iou_ci"]),
        f"final IoU (step {args.steps})": fmt_ci(s["final_iou_mean"], s["final_iou_ci"]),
        "fit s (mean)": fmt(s["fit_seconds_mean"], 0),
    } for s in summaries]  # fmt: skip
    run_table = [{
        "method": r["method"], "seed": r["seed"], "convergence step": fmt(r["convergence_step"]),
        "IoU there": fmt(r["iou_at_convergence"]), "IoU step 0": fmt(r["step0_iou"]), "peak IoU": fmt(r["peak_iou"]),
        "final IoU [95% bootstrap over pairs]": f"{r['final_iou']:.3f} [{r['final_iou_low']:.3f}, "
                                                f"{r['final_iou_high']:.3f}]",
        "fit s": fmt(r["fit_seconds"], 0),
    } for r in rows]  # fmt: skip
    step_columns = ["step", *[name for key, name in METHODS.items() if any(r["method_key"] == key for r in rows)]]
    if math.isfinite(gain):
        direction = "faster" if gain > 0 else "slower"
        verdict = (f"Diff-Tuning converged {abs(100 * gain):.0f}% {direction} than plain ControlNet training (the "
                   f"paper: {100 * PAPER_SPEEDUP:.0f}% faster), {fmt(paired_mean, 0)} steps sooner on average "
                   f"(paired by seed, 95% t-interval {fmt_ci(paired_mean, paired_half, 0)} over {paired_n} seeds; "
                   f"exact permutation p = {fmt(p_value, 2)} over the splits of the runs; percentile bootstrap "
                   f"interval of the speed-up {100 * low:+.0f}% to {100 * high:+.0f}%, too narrow at this seed count). "
                   "With so few seeds and a 10-step resolution this is consistent with the paper's figure, not a "
                   "confirmation of it.")  # fmt: skip
    else:
        verdict = "No speed-up can be computed: a method has no converged run."
    notes = [
        f"Command: `python -m benchmarks.controlnet {' '.join(args.argv)}`; {invocation_note(args.invocation)}; "
        f"{len(rows)} runs, seeds {args.seed_list} (seed_everything and data seed), {args.steps} steps each, batch "
        f"16, one thread per run, {args.jobs} at a time on {os.cpu_count()} cores (fit times are wall times and grow "
        "when other jobs share the cores; Diff-Tuning's include drawing its memory bank of 256 samples when it is not "
        "cached yet; its training step costs what plain training's does, with the same batch of 16).",
        f"Adherence: the ControlAdherenceMonitor at step 0, every {args.every} steps and at the end, on the first "
        f"{args.pairs} held-out pairs of the embedded control task with sampling seeds 0-{args.pairs - 1} "
        f"({args.sample_steps} DDIM steps, guidance 2): the mean over pairs of the IoU of the drawn shape (pixels "
        "more than half-way from the prompt's background colour to the drawn colour) with the control's silhouette.",
        f'Convergence step (inferred stand-in for the papers\' "sudden convergence", judged there by eye): the first '
        f"evaluation from which the mean IoU stays >= {args.threshold}; resolution {args.every} steps. Means and 95% "
        "Student-t intervals over the seeds that converged; runs that did not converge are counted, not averaged.",
        f"Speed-up = 1 - mean step (Diff-Tuning) / mean step (plain): {fmt(100 * gain, 0)}% [{fmt(100 * low, 0)}%, "
        f"{fmt(100 * high, 0)}%] (percentile bootstrap, {args.resamples} resamples, numpy seed 0, groups resampled "
        f"independently; coarse at {len(args.seed_list)} seeds). Paired by seed (same seed_everything, data order "
        f"and ControlNet initialisation): plain minus Diff-Tuning {fmt_ci(paired_mean, paired_half, 1)} steps (95% "
        f"Student t over {paired_n} seeds). Exact two-sided permutation test of the mean steps over every split of "
        f"the runs: p = {fmt(p_value, 3)}. The paper reports {100 * PAPER_SPEEDUP:.0f}% on Stable Diffusion with "
        "five control conditions.",
        f"Reference levels on the same {levels['pairs']} pairs: renders {levels['renders']:.3f} (the score's "
        f"ceiling), autoencoder round trips of the renders {levels['round_trip']:.3f} (the most a sample can get "
        f'through the decoder), pretrained model without a ControlNet {levels["pretrained"]:.3f} ("no training"; '
        f"same seeds), renders scored against another pair's control {levels['renders_other_control']:.3f} "
        "(the chance overlap of two random shapes).",
        f"Curves: `{Path(out).name}.png`; mean IoU per step: below and `{Path(out).name}_steps.csv`; grid "
        f"(control with its prompt, then each method's first-seed samples at its convergence step and at step 0): "
        f"`{Path(grid).name}`.",
    ]
    lines = ["# ControlNet on limited data: plain vs Diff-Tuning, convergence of control adherence", "", verdict, "",
             *markdown_table(summary_table, list(summary_table[0])), "", *markdown_table(run_table, list(run_table[0])),
             "", "Mean IoU over seeds per evaluated step (± 95% t over seeds):", "",
             *markdown_table(steps, step_columns), "", *notes, "", f"![control | prompt | sample]({Path(grid).name})",
             ""]  # fmt: skip
    Path(f"{out}.md").write_text("\n".join(lines))
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method: 0 .. N-1")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--every", type=int, default=10, help="monitor evaluation period (steps)")
    parser.add_argument("--pairs", type=int, default=32, help="held-out pairs per evaluation")
    parser.add_argument("--threshold", type=float, default=0.6, help="mean IoU that counts as converged")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=2, help="fits at a time, one thread each")
    parser.add_argument("--root", default=str(REPO / "runs" / "bench_controlnet"))
    parser.add_argument("--out", default=str(RESULTS / "controlnet"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate only")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.seed_list = list(range(args.seeds))
    root = Path(args.root).resolve()

    jobs = []
    for method in args.methods:
        config = bench_config(method, args.every, args.threshold)
        monitor = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("Monitor"))
        steps = monitor["init_args"].get("steps") or config["model"]["init_args"].get("sample_steps", 25)
        if method == BASELINE or not hasattr(args, "sample_steps"):
            args.sample_steps = int(steps)  # the reference levels are sampled as the monitor samples
        config["trainer"]["callbacks"] = [
            {**c, "init_args": {**c["init_args"], "pairs": args.pairs}} if c["class_path"].endswith("Monitor") else c
            for c in config["trainer"]["callbacks"]
        ]
        config_path = root / "configs" / f"{method}_every{args.every}_pairs{args.pairs}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        for seed in args.seed_list:
            run_root = root / f"steps{args.steps}" / method / f"seed{seed}"
            settings = {"config": config, "steps": args.steps, "seed": seed}
            jobs.append({"method": method, "seed": seed, "steps": args.steps, "extra": [], "config": config_path,
                         "root": run_root, "settings": settings,
                         "todo": finished_log_dir(run_root, args.steps, settings) is None})  # fmt: skip
    todo = [j for j in jobs if j["todo"]]
    args.reused = len(jobs) - len(todo)
    single = sum(estimate_seconds(j["method"], j["steps"], args.every) for j in todo)
    single += COST["memory_bank_s"] * any(j["method"] == TREATED for j in todo)
    expected = single / max(1, min(args.jobs, len(todo) or 1)) + 30  # + the reference levels and the outputs
    print(f"controlnet: {len(jobs)} runs ({len(jobs) - len(todo)} finished, reused; {len(todo)} to run, {args.jobs} at "
          f"a time); expected run time {expected / 60:.0f} min ({single / 60:.0f} min of single-thread fits)",
          flush=True)  # fmt: skip
    for j in todo:
        seconds = estimate_seconds(j["method"], j["steps"], args.every)
        print(f"  to run: {j['root'].relative_to(root)} (~{seconds:.0f} s)")
    if args.dry_run:
        return []

    start, args.load = time.perf_counter(), [os.getloadavg()[1]]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(fit, jobs))
    levels = reference_levels(args.pairs, args.sample_steps, root)
    wall = time.perf_counter() - start
    args.load.append(os.getloadavg()[1])
    # The invocation that ran the fits is the one whose wall time the table reports; a later one that only reuses
    # them (to rewrite the outputs) reports that record.
    record = root / f"invocation_steps{args.steps}.json"
    if todo or not record.exists():
        record.write_text(json.dumps({"wall": wall, "expected": expected, "load": args.load, "ran": len(todo),
                                      "command": args.argv}, indent=1))  # fmt: skip
    args.invocation = json.loads(record.read_text())

    rows, curves = [], {}
    for job, (log_dir, seconds, _) in zip(jobs, results):  # CPU times mix when fits run side by side: not kept
        curve = read_curve(log_dir)
        curves[(job["method"], job["seed"])] = curve
        rows.append({"method": METHODS[job["method"]], "method_key": job["method"], "seed": job["seed"],
                     **analyse(curve, args.threshold), "fit_seconds": seconds,
                     "log_dir": str(log_dir.relative_to(REPO) if log_dir.is_relative_to(REPO) else log_dir),
                     "log_dir_abs": str(log_dir)})  # fmt: skip
    summaries = summarise(rows)
    write_outputs(rows, curves, summaries, levels, Path(args.out).resolve(), args, wall, expected)
    print(f"controlnet: wall time {wall / 60:.1f} min (expected {expected / 60:.0f} min)")
    return rows


if __name__ == "__main__":
    main()
