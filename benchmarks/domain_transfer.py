"""Plain fine-tuning vs Diff-Tuning vs SDFT on the embedded few-shot domain: what each learns, what each forgets.

For each method (``experiments/dit/{finetune_domain,diff_tuning,sdft}.yaml`` with ``--model dit``, the
text-to-image ones in ``experiments/`` with ``--model t2i``) and each seed, the experiment is fitted through the CLI,
then its exported model is scored with the embedded feature network (torchmetrics FID/KID):

- target: ``--samples`` images drawn with the conditions (class labels or captions) of the held-out domain rows,
  FID/KID against the 2,000 held-out domain images (outlined shapes), i.e. the distribution, not the 32 training ones;
- source: ``--samples`` images for random source specs (filled shapes), FID/KID against 2,000 source renders: how much
  of the pretrained domain each method forgets.

The pretrained model is scored the same way ("no fine-tuning" row).

To run: python -m benchmarks.domain_transfer [--model dit --steps 500 --seeds 0 1 2 --samples 500 --jobs 2]
Writes benchmarks/results/domain_transfer_<model>.{md,csv,png}; runs go to runs/bench_domain_<model>/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.launch import REPO, fit_run
from benchmarks.tables import write_csv

RESULTS = REPO / "benchmarks" / "results"
METHODS = {"plain fine-tune": "finetune_domain.yaml", "Diff-Tuning": "diff_tuning.yaml", "SDFT": "sdft.yaml"}
MODELS = {"dit": ("experiments/dit", "shapes-dit"), "t2i": ("experiments", "shapes-t2i")}
SOURCE_SEED, REFERENCE_SEED = 777, 4242


def evaluate(model: str, samples: int, reference: int, steps: int, guidance: float) -> dict[str, float]:
    """FID/KID of ``model``'s samples against the held-out domain (target) and source renders (source)."""
    import numpy as np
    import torch

    from lightning_ft.core import DiffusionBase
    from lightning_ft.data import shapes
    from lightning_ft.data.folder import list_images, load_image
    from lightning_ft.data.targets import ensure_target
    from lightning_ft.metrics import FIDScorer, default_feature_net

    torch.manual_seed(0)
    module = DiffusionBase(pretrained=model)
    net = default_feature_net()

    def to_unit(images) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255

    def draw(prompts: list[str], labels: list[int]) -> torch.Tensor:
        kwargs = {"labels": labels} if module.conditioning == "class" else {"prompts": prompts}
        seeds = list(range(len(labels)))
        return module.generate(**kwargs, seeds=seeds, steps=steps, guidance_scale=guidance, batch_size=100)

    heldout = ensure_target("domain") / "heldout"
    rows = [json.loads(line) for line in (heldout / "captions.jsonl").read_text().splitlines() if line.strip()]
    target_reference = to_unit(load_image(f) for f in list_images(heldout, "heldout"))
    target = draw([r["caption"] for r in rows[:samples]], [r["label"] for r in rows[:samples]])
    specs = [shapes.spec_for_index(SOURCE_SEED, i) for i in range(samples)]
    source = draw([s.caption for s in specs], [shapes.class_label(s) for s in specs])
    renders = np.stack([shapes.render(shapes.spec_for_index(REFERENCE_SEED, i)) for i in range(reference)])
    source_reference = torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 255
    scores = {}
    for name, images, ref in (("target", target, target_reference), ("source", source, source_reference)):
        result = FIDScorer(net).set_reference(ref).score(images)
        scores[f"{name}_fid"], scores[f"{name}_kid_x1000"] = result["fid"], 1000 * result["kid_mean"]
    from lightning_ft.callbacks.sample_grid import save_grid

    save_grid(torch.cat([target[:16], source[:16]]), Path(model).parent / "samples.png", columns=8)
    return {**scores, "samples": samples, "target_reference": len(target_reference), "source_reference": reference}


def evaluate_in_subprocess(model: Path, out: Path, args) -> dict:
    """Score one model in a fresh single-threaded process (so that two jobs share 2 cores without thrashing)."""
    if not out.exists():
        command = [sys.executable, "-m", "benchmarks.domain_transfer", "--evaluate", str(model), "--json", str(out),
                   "--samples", str(args.samples), "--reference", str(args.reference),
                   "--sample-steps", str(args.sample_steps), "--guidance", str(args.guidance)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run(command, check=True, env=env, cwd=REPO)
    return json.loads(out.read_text())


def one_job(method: str, seed: int | None, args) -> dict:
    root = Path(args.root)
    if method == "no fine-tuning":
        from lightning_ft.paths import asset_path

        model, out = asset_path(MODELS[args.model][1]), root / "pretrained.json"
    else:
        config = f"{MODELS[args.model][0]}/{METHODS[method]}"
        run_root = root / Path(METHODS[method]).stem / f"seed{seed}"
        log_dir = fit_run(config, seed, args.steps, run_root, args.extra)
        model, out = log_dir / "export", run_root / "scores.json"
    return {"method": method, "seed": seed, **evaluate_in_subprocess(model, out, args)}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_outputs(rows: list[dict], out: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, f"{out}.csv")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_method = {m: [r for r in rows if r["method"] == m] for m in methods}
    plain = statistics.mean(r["target_fid"] for r in by_method.get("plain fine-tune", rows))
    lines = [
        f"Model `{MODELS[args.model][1]}`, {args.steps} steps per run, seeds {args.seeds}; {args.samples} samples per "
        f"model and set ({args.sample_steps} DDIM steps, guidance {args.guidance}); FID/KID with the embedded feature "
        f"network against {rows[0]['target_reference']} held-out domain images (target) and {args.reference} source "
        "renders (source). Mean ± std over seeds.",
        "",
        "| method | seeds | target FID | target KID x1000 | target FID vs plain | source FID | source KID x1000 |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, group in by_method.items():
        fid = [r["target_fid"] for r in group]
        change = f"{100 * (statistics.mean(fid) / plain - 1):+.1f}%"
        lines.append(
            f"| {method} | {len(group) if group[0]['seed'] is not None else '-'} | {mean_std(fid)} | "
            f"{mean_std([r['target_kid_x1000'] for r in group])} | {change} | "
            f"{mean_std([r['source_fid'] for r in group])} | {mean_std([r['source_kid_x1000'] for r in group])} |"
        )
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, title in zip(axes, ("target_fid", "source_fid"), ("target FID (held-out domain)", "source FID")):
        for i, group in enumerate(by_method.values()):
            values = [r[key] for r in group]
            axis.bar(i, statistics.mean(values), color=f"C{i}", alpha=0.6)
            axis.scatter([i] * len(values), values, color="k", s=12, zorder=3)
        axis.set_xticks(range(len(by_method)), list(by_method), rotation=15)
        axis.set_title(f"{title}, lower is better")
    figure.tight_layout()
    figure.savefig(f"{out}.png", dpi=90)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="dit")
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
    args = parser.parse_args(argv)
    if args.evaluate:  # the per-model scoring subprocess
        scores = evaluate(args.evaluate, args.samples, args.reference, args.sample_steps, args.guidance)
        Path(args.json).write_text(json.dumps(scores))
        return [scores]
    args.root = args.root or str(REPO / "runs" / f"bench_domain_{args.model}")
    args.out = args.out or str(RESULTS / f"domain_transfer_{args.model}")

    jobs = [("no fine-tuning", None)] + [(method, seed) for method in METHODS for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: one_job(*job, args), jobs))
    write_outputs(rows, Path(args.out), args)
    return rows


if __name__ == "__main__":
    main()
