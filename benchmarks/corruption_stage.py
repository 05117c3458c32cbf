"""DreamBooth vs BNN fine-tuning on the embedded subject: does a corruption stage appear, and does BNN remove it?

Runs each experiment (``experiments/dreambooth.yaml``, ``experiments/dreambooth_bnn.yaml``) for ``--steps``
steps and several seeds, with the ``CorruptionStageMonitor`` of the experiment file sampling fixed seeds; then gathers
each run's ``corruption_stage.csv`` into one table (verdict, corruption interval, dip depth, best step, final fidelity)
and one plot of the fidelity and corruption-score curves.

To run: python -m benchmarks.corruption_stage [--steps 1200 --seeds 0 1 2 --jobs 2]
Writes benchmarks/results/corruption_stage.{md,csv,png}; the runs themselves go to runs/bench_corruption/.
"""

from __future__ import annotations

import argparse
import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.launch import REPO, fit_run
from benchmarks.tables import saved_figure, write_csv
from lightning_ft.callbacks.stage_rules import classify_stages

RESULTS = REPO / "benchmarks" / "results"
METHODS = {"DreamBooth": "experiments/dreambooth.yaml", "BNN (DreamBooth-BNN)": "experiments/dreambooth_bnn.yaml"}


def read_curve(log_dir: Path) -> dict[str, list[float]]:
    with open(log_dir / "corruption_stage.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(r[key]) for r in rows] for key in rows[0] if key != "stage"}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--root", default=str(REPO / "runs" / "bench_corruption"))
    parser.add_argument("--extra", nargs="*", default=[], help="more CLI overrides for every run, e.g. --model.lr 1e-4")
    parser.add_argument("--out", default=str(RESULTS / "corruption_stage"))
    args = parser.parse_args(argv)

    jobs = [(name, config, seed) for name, config in METHODS.items() for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            job: pool.submit(fit_run, job[1], job[2], args.steps,
                             Path(args.root) / Path(job[1]).stem / f"seed{job[2]}", args.extra)
            for job in jobs
        }  # fmt: skip
        log_dirs = {job: future.result() for job, future in futures.items()}

    rows, curves = [], {}
    for (name, _, seed), log_dir in log_dirs.items():
        curve = read_curve(log_dir)
        report = classify_stages(curve["step"], curve["fidelity"], curve["score"], curve.get("memorisation"))
        # Fidelity-only rule (inferred; docs/methods.md, BNN): a drop of max(0.1, 0.3 x rise) below the running max
        # counts, noisy samples or not.
        fidelity_only = classify_stages(curve["step"], curve["fidelity"], curve["score"], require_noise=False)
        curves[(name, seed)] = curve
        interval = f"{report.corruption_start}-{report.corruption_end}" if report.corruption_detected else "none"
        dip_only = (
            f"{fidelity_only.corruption_start}-{fidelity_only.corruption_end}"
            if fidelity_only.corruption_detected
            else "none"
        )
        rows.append({
            "method": name, "seed": seed, "verdict": report.verdict, "corruption_stage": interval,
            "fidelity_dip_only": dip_only,
            "dip_depth": report.dip_depth, "best_step": report.best_step_before_corruption,
            "peak_fidelity": max(curve["fidelity"]), "final_fidelity": curve["fidelity"][-1],
            "max_corruption_score": max(curve["score"]), "final_memorisation": curve["memorisation"][-1],
        })  # fmt: skip
    write_outputs(rows, curves, Path(args.out), args)
    return rows


def write_outputs(rows: list[dict], curves: dict, out: Path, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, f"{out}.csv")
    lines = [
        f"{len(args.seeds)} seeds x {args.steps} steps per method; the experiment files' CorruptionStageMonitor "
        "samples fixed seeds every 50 steps; fidelity = mean cosine of the embedded feature net between "
        "samples and the 5 instance images; corruption score = high-frequency energy of samples / of instances.",
        "",
        "| method | seed | verdict | corruption stage (monitor rule) | fidelity dip (fidelity-only rule) | dip depth | "
        "best step | peak fidelity | final fidelity | max corruption score | final memorisation |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['verdict']} | {r['corruption_stage']} | {r['fidelity_dip_only']} | "
            f"{r['dip_depth']:.3f} | "
            f"{r['best_step']} | {r['peak_fidelity']:.3f} | {r['final_fidelity']:.3f} | "
            f"{r['max_corruption_score']:.2f} | {r['final_memorisation']:.3f} |"
        )
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    colours = {name: f"C{i}" for i, name in enumerate(METHODS)}
    with saved_figure(f"{out}.png", 3, (15, 4)) as axes:
        for (name, seed), curve in curves.items():
            for axis, key in zip(axes, ("fidelity", "score", "memorisation")):
                axis.plot(curve["step"], curve[key], color=colours[name], alpha=0.8,
                          label=name if seed == args.seeds[0] else None)  # fmt: skip
        for axis, title in zip(axes, ("subject fidelity", "corruption score (HF energy ratio)", "memorisation")):
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.legend()


if __name__ == "__main__":
    main()
