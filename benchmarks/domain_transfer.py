"""Fine-tuning methods on the embedded few-shot domain: what each learns, what each forgets, what it costs.

For each method of ``--methods`` (experiment files ``experiments/dit/*.yaml`` with ``--model dit``, the text-to-image
ones in ``experiments/`` with ``--model t2i``) and each seed, the experiment is fitted through the CLI, then its
exported model is scored with the embedded feature network (torchmetrics FID/KID, mean pairwise feature distance
as diversity):

- target: ``--samples`` images drawn with the conditions (class labels or captions) of the held-out domain rows,
  FID/KID against the 2,000 held-out domain images (outlined shapes), i.e. the distribution, not the 32 training ones;
- source: ``--samples`` images for random source specs (filled shapes), FID/KID against 2,000 source renders: how much
  of the pretrained domain each method forgets (not for ANL, whose samples come from condition images).

ANL is scored once per ``--mask-rates`` value on the same fitted run, conditioned on the training images (cycled).
The pretrained model is scored the same way ("no fine-tuning" row). Finished runs (export + scores) are reused.

To run (issue 5): python -m benchmarks.domain_transfer --model dit --methods plain diff_tuning sdft
To run (issue 6): python -m benchmarks.domain_transfer --model t2i --methods plain a3fta anl --mask-rates 0.25 0.5 0.75
Common options: --steps 500 --seeds 0 1 2 --samples 500 --jobs 2. Writes benchmarks/results/domain_transfer_<model>
(or --out).{md,csv,png}; runs go to runs/bench_domain_<model>/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.launch import REPO, fit_run
from benchmarks.tables import saved_figure, write_csv

RESULTS = REPO / "benchmarks" / "results"
#: method key -> (table name, experiment file, module class that loads its export)
METHODS = {
    "plain": ("plain fine-tune", "finetune_domain.yaml", "lightning_ft.core.DiffusionBase"),
    "diff_tuning": ("Diff-Tuning", "diff_tuning.yaml", "lightning_ft.core.DiffusionBase"),
    "sdft": ("SDFT", "sdft.yaml", "lightning_ft.core.DiffusionBase"),
    "a3fta": ("A3FTA", "a3fta.yaml", "lightning_ft.methods.AdapterAttentionFineTuning"),
    "anl": ("ANL", "anl.yaml", "lightning_ft.methods.ConditionTuning"),
}
MODELS = {"dit": ("experiments/dit", "shapes-dit"), "t2i": ("experiments", "shapes-t2i")}
SOURCE_SEED, REFERENCE_SEED = 777, 4242


def evaluate(
    model: str, loader: str, samples: int, reference: int, steps: int, guidance: float, mask_rate: float | None
) -> dict[str, float]:
    """FID/KID and diversity of ``model``'s samples against the held-out domain (target) and source renders (source).

    ``loader`` is the dotted class that loads the export; ``mask_rate`` is set for ANL, which samples from its
    reference condition images (the training images) instead of prompts or labels, and has no source score."""
    import importlib

    import numpy as np
    import torch

    from lightning_ft.data.folder import list_images, load_image
    from lightning_ft.embedded import shapes
    from lightning_ft.embedded.feature_net import default_feature_net
    from lightning_ft.embedded.targets import ensure_target
    from lightning_ft.metrics import FIDScorer, diversity

    torch.manual_seed(0)
    module_name, _, class_name = loader.rpartition(".")
    module = getattr(importlib.import_module(module_name), class_name)(pretrained=model)
    trainable = sum(p.numel() for p in module.trainable_parameters())
    net = default_feature_net()

    def to_unit(images) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255

    def draw(prompts: list[str], labels: list[int]) -> torch.Tensor:
        kwargs = {"labels": labels} if module.conditioning == "class" else {"prompts": prompts}
        if mask_rate is not None:
            kwargs = {"mask_rate": mask_rate}  # conditioned on the reference images, cycled over the seeds
        seeds = list(range(len(labels)))
        return module.generate(**kwargs, seeds=seeds, steps=steps, guidance_scale=guidance, batch_size=100)

    heldout = ensure_target("domain") / "heldout"
    rows = [json.loads(line) for line in (heldout / "captions.jsonl").read_text().splitlines() if line.strip()]
    target_reference = to_unit(load_image(f) for f in list_images(heldout, "heldout"))
    target = draw([r["caption"] for r in rows[:samples]], [r["label"] for r in rows[:samples]])
    specs = [shapes.spec_for_index(SOURCE_SEED, i) for i in range(samples)]
    sets = [("target", target, target_reference)]
    grid = target[:16]
    if mask_rate is None:
        source = draw([s.caption for s in specs], [shapes.class_label(s) for s in specs])
        renders = np.stack([shapes.render(shapes.spec_for_index(REFERENCE_SEED, i)) for i in range(reference)])
        sets.append(("source", source, torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 255))
        grid = torch.cat([grid, source[:16]])
    scores = {"source_fid": float("nan"), "source_kid_x1000": float("nan")}
    for name, images, ref in sets:
        result = FIDScorer(net).set_reference(ref).score(images)
        scores[f"{name}_fid"], scores[f"{name}_kid_x1000"] = result["fid"], 1000 * result["kid_mean"]
    scores["target_diversity"] = diversity(target, net)
    return scores | {"trainable_params": trainable, "samples": samples, "target_reference": len(target_reference),
                     "source_reference": reference}, grid  # fmt: skip


def evaluate_in_subprocess(model: Path, loader: str, out: Path, args, mask_rate: float | None = None) -> dict:
    """Score one model in a fresh single-threaded process (so that two jobs share 2 cores without thrashing)."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "benchmarks.domain_transfer", "--evaluate", str(model), "--loader", loader,
                   "--json", str(out), "--samples", str(args.samples), "--reference", str(args.reference),
                   "--sample-steps", str(args.sample_steps), "--guidance", str(args.guidance)]  # fmt: skip
        if mask_rate is not None:
            command += ["--mask-rate", str(mask_rate)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run(command, check=True, env=env, cwd=REPO)
    return json.loads(out.read_text())


def one_job(method: str, seed: int | None, args) -> list[dict]:
    """Fit (unless a finished run is there) and score one method and seed; ANL gives one row per mask rate."""
    root = Path(args.root)
    if method == "pretrained":
        from lightning_ft.embedded import asset_path

        model, out = asset_path(MODELS[args.model][1]), root / "pretrained.json"
        scores = evaluate_in_subprocess(model, METHODS["plain"][2], out, args)
        return [{"method": "no fine-tuning", "seed": None, **scores, "trainable_params": 0}]
    name, experiment, loader = METHODS[method]
    run_root = root / Path(experiment).stem / f"seed{seed}"
    done = sorted(run_root.glob("lightning_logs/*/export/model_index.json"))
    if done:
        log_dir = done[-1].parents[1]
    else:
        started = time.perf_counter()
        log_dir = fit_run(f"{MODELS[args.model][0]}/{experiment}", seed, args.steps, run_root, args.extra)
        (run_root / "fit_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    timing = run_root / "fit_seconds.txt"
    seconds = float(timing.read_text()) if timing.exists() else float("nan")
    if method != "anl":
        scores = evaluate_in_subprocess(log_dir / "export", loader, run_root / "scores.json", args)
        return [{"method": name, "seed": seed, **scores, "fit_seconds": seconds}]
    return [
        {"method": f"{name} (mask {m})", "seed": seed, "fit_seconds": seconds,
         **evaluate_in_subprocess(log_dir / "export", loader, run_root / f"scores_m{m}.json", args, m)}
        for m in args.mask_rates
    ]  # fmt: skip


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]  # NaN: not measured (a reused run, ANL's source score)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_outputs(rows: list[dict], out: Path, args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, f"{out}.csv")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_method = {m: [r for r in rows if r["method"] == m] for m in methods}
    plain = statistics.mean(r["target_fid"] for r in by_method.get("plain fine-tune", rows))
    lines = [
        f"Model `{MODELS[args.model][1]}`, {args.steps} steps per run, seeds {args.seeds}; {args.samples} samples per "
        f"model and set ({args.sample_steps} DDIM steps, guidance {args.guidance}); FID/KID with the embedded feature "
        f"network against {rows[0]['target_reference']} held-out domain images (target) and {args.reference} source "
        "renders (source); diversity = mean pairwise feature distance of the target samples; fit time = wall time "
        "of the whole fit (setup, memory bank, sampling callbacks included) on one CPU thread. Mean ± std over seeds.",
        "",
        "| method | seeds | target FID | target KID x1000 | target FID vs plain | diversity | source FID | "
        "source KID x1000 | trainable params | fit time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, group in by_method.items():
        fid = [r["target_fid"] for r in group]
        change = f"{100 * (statistics.mean(fid) / plain - 1):+.1f}%"
        fit = [r.get("fit_seconds", float("nan")) for r in group]
        lines.append(
            f"| {method} | {len(group) if group[0]['seed'] is not None else '-'} | {mean_std(fid)} | "
            f"{mean_std([r['target_kid_x1000'] for r in group])} | {change} | "
            f"{mean_std([r['target_diversity'] for r in group])} | "
            f"{mean_std([r['source_fid'] for r in group])} | {mean_std([r['source_kid_x1000'] for r in group])} | "
            f"{group[0]['trainable_params']:,} | {mean_std(fit)} |"
        )
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    with saved_figure(f"{out}.png", 2, (11, 4)) as axes:
        for axis, key, title in zip(axes, ("target_fid", "source_fid"), ("target FID (held-out domain)", "source FID")):
            for i, group in enumerate(by_method.values()):
                values = [r[key] for r in group]
                axis.bar(i, statistics.mean(values), color=f"C{i}", alpha=0.6)
                axis.scatter([i] * len(values), values, color="k", s=12, zorder=3)
            axis.set_xticks(range(len(by_method)), list(by_method), rotation=15)
            axis.set_title(f"{title}, lower is better")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="dit")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["plain", "diff_tuning", "sdft"])
    parser.add_argument("--mask-rates", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--reference", type=int, default=2000)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--root", default=None)
    parser.add_argument("--extra", nargs="*", default=[], help="more CLI overrides for every run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--evaluate", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loader", default=METHODS["plain"][2], help=argparse.SUPPRESS)
    parser.add_argument("--mask-rate", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.evaluate:  # the per-model scoring subprocess
        scores = evaluate(
            args.evaluate, args.loader, args.samples, args.reference, args.sample_steps, args.guidance, args.mask_rate
        )
        from lightning_ft.callbacks.sample_grid import save_grid

        scores, grid = scores
        save_grid(grid, Path(args.json).with_suffix(".png"), columns=8)  # beside the scores, never in the model
        Path(args.json).write_text(json.dumps(scores))
        return [scores]
    args.root = args.root or str(REPO / "runs" / f"bench_domain_{args.model}")
    args.out = args.out or str(RESULTS / f"domain_transfer_{args.model}")

    jobs = [("pretrained", None)] + [(method, seed) for method in args.methods for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = [row for rows in pool.map(lambda job: one_job(*job, args), jobs) for row in rows]
    write_outputs(rows, Path(args.out), args)
    return rows


if __name__ == "__main__":
    main()
