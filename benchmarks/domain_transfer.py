"""Fine-tuning methods on the embedded few-shot domain: what each learns, what each forgets, what it costs.

Two tables, each written by one command (finished fits and scores are reused when a command is re-run; the expected
run time of what is left to do is printed before anything starts):

    python -m benchmarks.domain_transfer --table forgetting   # plain vs Diff-Tuning vs SDFT: target and source
    python -m benchmarks.domain_transfer --table peft         # full vs LoRA vs A3FTA vs ANL (mask rates)

For each method (experiment files ``experiments/*.yaml`` with ``--model t2i``, ``experiments/dit/*.yaml`` with
``--model dit``, each with the data config its header names: ``configs/data/embedded_domain.yaml``) and each seed,
the experiment is fitted through the CLI in a fresh single-threaded process (the experiment's monitors replaced by
the export alone, validation off: the fit time is the fit's), then its export is scored in another fresh process
with the embedded feature network (torchmetrics FID/KID; diversity = mean pairwise 1 - cosine of the features):

- target: ``--samples`` images drawn with the captions (or class labels) of the first held-out domain rows, FID/KID
  against the 2,000 held-out domain images (outlined shapes): the distribution, not the 32 training images;
- source: ``--samples`` images for the captions of random source specs (filled shapes), FID/KID against 2,000 source
  renders: how much of the pretrained domain a method forgets (``forgetting`` table; ANL has none: its samples come
  from condition images).

Sample i of every model uses seed i and the same caption, so rows differ by model only. ANL is fitted once per seed and
scored at its default mask rate, then once per ``--mask-rates`` value at ``--mask-samples`` samples (conditioned on the
training images, cycled). The pretrained model is scored the same way ("no fine-tuning"); two rows score renders
instead of samples, with the same counts: "renders (floor)", what a perfect model would get, and "autoencoder round
trip of renders", the best the latent space allows. Means carry 95% t-intervals over seeds (Student t, n - 1 degrees
of freedom); the differences to the baseline row are paired by seed (same data order, same sampling seeds) with their
own t-interval.

Writes ``<out>.md``, ``<out>.csv`` (one row per run and score), ``<out>_summary.csv`` (means and intervals) and
``<out>.png`` (a grid: real images, then the pretrained model and every method's seed-0 samples for the same
prompts). Runs go to ``runs/bench_domain_<model>/<method>/seed<k>/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fits import t_interval
from benchmarks.launch import REPO, config_args, fit_run
from benchmarks.perf import add_device_arguments, device_overrides
from benchmarks.tables import saved_figure, write_csv

RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Method:
    name: str  # table name
    experiment: str  # file under the model's experiment folder
    loader: str  # dotted class that loads the export
    extra: tuple[str, ...] = ()  # CLI overrides of this method
    full_lr: bool = False  # a full fine-tune: --lr (the sweep's choice) applies
    source: bool = True  # samples from captions/labels, so it has a source score


METHODS = {
    "plain": Method("plain fine-tune", "finetune_domain.yaml", "lightning_ft.core.DiffusionBase", full_lr=True),
    "diff_tuning": Method("Diff-Tuning", "diff_tuning.yaml", "lightning_ft.core.DiffusionBase", full_lr=True),
    "sdft": Method("SDFT", "sdft.yaml", "lightning_ft.core.DiffusionBase", full_lr=True),
    # The LoRA settings of experiments/dreambooth_lora.yaml (rank 4 on every attention projection, lr 1e-3, weight
    # decay 1e-2) on the domain data of finetune_domain.yaml.
    "lora": Method(
        "LoRA (rank 4)",
        "finetune_domain.yaml",
        "lightning_ft.core.DiffusionBase",
        (
            "--model.init_args.trainable=lora",
            "--model.init_args.lora_rank=4",
            "--model.init_args.lr=1e-3",
            "--model.init_args.weight_decay=1e-2",
        ),
    ),  # fmt: skip
    "a3fta": Method("A3FTA", "a3fta.yaml", "lightning_ft.methods.AdapterAttentionFineTuning"),
    "anl": Method("ANL", "anl.yaml", "lightning_ft.methods.ConditionTuning", source=False),
}
MODELS = {"dit": ("experiments/dit", "shapes-dit"), "t2i": ("experiments", "shapes-t2i")}
SOURCE_SEED, REFERENCE_SEED, RENDER_SEED = 777, 4242, 99
# Every benchmark fit: the export only (no sampling monitors, no checkpoints, no validation), so that the fit time is
# the method's own.
FIT_OVERRIDES = (
    '--trainer.callbacks=[{"class_path": "lightning_ft.callbacks.DiffusersExport"}]',
    "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
)  # fmt: skip
TABLES = {
    # table: (methods, score the source set, ANL's mask rates for its diversity table, name of the plain row)
    "forgetting": (["plain", "diff_tuning", "sdft"], True, [0.0, 0.5, 0.75], "plain fine-tune"),
    "peft": (["plain", "lora", "a3fta", "anl"], False, [0.0, 0.5, 0.75], "full fine-tune"),
}
#: rows of renders instead of samples (``evaluate(renders=...)``): the FID a perfect model would get at the same
#: sample count, and the autoencoder's ceiling (every latent model's samples go through its decoder)
RENDER_ROWS = {"renders": "renders (floor)", "round_trip": "autoencoder round trip of renders"}
#: ANL's mask rate in the main table (the experiment file's); the other rates go to the mask-rate table
ANL_MASK_RATE = 0.5
# Expected cost on one uncontended core (OMP_NUM_THREADS=1), calibrated from the CPU time of this benchmark's runs on
# a 2-core Xeon: seconds per training step at batch 16, per fit (process start, loading, export), for Diff-Tuning's
# memory bank (256 samples, sampled once and cached), per sample and sampler step at guidance 2 (two UNet passes),
# and per scoring process (loading, reference features). On a machine shared with other jobs the wall time is longer.
STEP_SECONDS = {"plain": 0.20, "diff_tuning": 0.19, "sdft": 0.27, "lora": 0.15, "a3fta": 0.18, "anl": 0.21}
FIT_OVERHEAD_SECONDS, MEMORY_BANK_SECONDS = 15.0, 27.0
SAMPLE_STEP_SECONDS = {"a3fta": 0.0077, "anl": 0.0095}
SAMPLE_STEP_SECONDS_DEFAULT = 0.0069
SCORE_OVERHEAD_SECONDS = 15.0


# ------------------------------------------------------------------------------------------------ statistics
def paired_differences(rows: list[dict], baseline: list[dict], key: str) -> list[float]:
    """``row[key] - baseline[key]`` for every seed present (and measured) in both, in the rows' order."""
    by_seed = {r["seed"]: r.get(key) for r in baseline}
    out = []
    for row in rows:
        base, value = by_seed.get(row["seed"]), row.get(key)
        if base is not None and value is not None and math.isfinite(base) and math.isfinite(value):
            out.append(value - base)
    return out


def format_ci(mean: float, half: float, digits: int = 2, signed: bool = False) -> str:
    """``12.34 ± 1.23``; the mean alone when there is no interval; ``-`` when nothing was measured."""
    if not math.isfinite(mean):
        return "-"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if not math.isfinite(half) else f"{text} ± {half:.{digits}f}"


METRICS = ("target_fid", "target_kid_x1000", "source_fid", "source_kid_x1000", "target_diversity", "fit_cpu_seconds",
           "fit_seconds")  # fmt: skip


def summarise(rows: list[dict], baseline: str | None, diff_keys: tuple[str, ...] = ("target_fid", "source_fid"),
              confidence: float = 0.95) -> list[dict]:  # fmt: skip
    """One row per method (in order of appearance): n, and for every metric its mean and t half-width; for
    ``diff_keys`` the paired difference to the ``baseline`` method's rows (mean, half-width, n) and the change of
    the means in percent. Rows without a seed (the pretrained model) are one measurement: no interval."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = {m: [r for r in rows if r["method"] == m] for m in methods}
    base = groups.get(baseline, [])
    out = []
    for method, group in groups.items():
        summary = {"method": method, "seeds": sum(r["seed"] is not None for r in group)}
        for key in METRICS:
            mean, half, _ = t_interval([r.get(key, math.nan) for r in group], confidence)
            summary[f"{key}_mean"], summary[f"{key}_ci"] = mean, half
        for key in diff_keys:
            paired = [r for r in group if r["seed"] is not None]
            diff, half, n = t_interval(paired_differences(paired, base, key), confidence) if base else (math.nan,) * 3
            base_mean = t_interval([r.get(key, math.nan) for r in base])[0] if base else math.nan
            summary[f"{key}_diff_mean"], summary[f"{key}_diff_ci"], summary[f"{key}_diff_n"] = diff, half, n
            change = 100 * (summary[f"{key}_mean"] / base_mean - 1) if base and base_mean else math.nan
            summary[f"{key}_change_pct"] = change
        for key in ("trainable_params", "samples"):
            summary[key] = group[0].get(key)
        out.append(summary)
    return out


# --------------------------------------------------------------------------------------------------- scoring
def reference_features(name: str, count: int, root: Path, images):
    """The feature network's features of a reference set, cached under ``root`` (computed by the first scoring)."""
    import torch

    from lightning_ft.embedded.feature_net import default_feature_net
    from lightning_ft.metrics import FIDScorer

    path = root / "reference_features" / f"{name}_{count}.pt"
    if path.exists():
        return torch.load(path)
    feats = FIDScorer(default_feature_net()).set_reference(images()).reference
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(feats, tmp)
    tmp.replace(path)
    return feats


def evaluate(model: str, loader: str, samples: int, reference: int, steps: int, guidance: float,
             mask_rate: float | None, source: bool, root: Path,
             renders: str | None = None) -> tuple[dict, dict]:  # fmt: skip
    """Scores of ``model``'s samples on the target (and, with ``source``, the source) set, and a preview (the
    first 16 samples of each set, uint8). ``mask_rate`` is set for ANL, which samples from its reference condition
    images (the training images, cycled) instead of captions or labels. ``renders`` replaces the samples by renders
    (``"renders"``: what a perfect model would score at this sample count; ``"round_trip"``: the same renders
    through ``model``'s autoencoder, the best its latents allow): fresh outlined shapes of the domain's distribution
    (not the held-out images, which are the reference) and the source specs the models are prompted with."""
    import importlib

    import numpy as np
    import torch

    from lightning_ft.data.folder import list_images, load_image
    from lightning_ft.embedded import shapes
    from lightning_ft.embedded.feature_net import default_feature_net
    from lightning_ft.embedded.targets import domain_spec, ensure_target
    from lightning_ft.metrics import FIDScorer, diversity

    torch.manual_seed(0)
    module_name, _, class_name = loader.rpartition(".")
    module = getattr(importlib.import_module(module_name), class_name)(pretrained=model)
    module.eval()
    net = default_feature_net()

    def to_unit(images) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255

    def draw(prompts: list[str], labels: list[int], specs=None) -> torch.Tensor:
        if renders is not None:
            images = torch.from_numpy(np.stack([shapes.render(spec) for spec in specs])).permute(0, 3, 1, 2) / 255
            return module.round_trip(images) if renders == "round_trip" else images
        kwargs = {"labels": labels} if module.family.needs_labels() else {"prompts": prompts}
        if mask_rate is not None:
            kwargs = {"mask_rate": mask_rate}  # conditioned on the reference images, cycled over the seeds
        seeds = list(range(len(labels)))
        return module.generate(**kwargs, seeds=seeds, steps=steps, guidance_scale=guidance, batch_size=250)

    heldout = ensure_target("domain") / "heldout"
    rows = [json.loads(line) for line in (heldout / "captions.jsonl").read_text().splitlines() if line.strip()]
    files = list_images(heldout, "heldout")
    target_reference = reference_features("target", len(files), root, lambda: to_unit(load_image(f) for f in files))
    rng = np.random.default_rng((RENDER_SEED, 2))
    target_specs = [domain_spec(rng)[0] for _ in range(samples)] if renders else None
    target = draw([r["caption"] for r in rows[:samples]], [r["label"] for r in rows[:samples]], target_specs)
    sets = [("target", target, target_reference)]
    to_uint8 = lambda x: (x[:16].clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
    preview = {"target": to_uint8(target)}
    if source:
        specs = [shapes.spec_for_index(SOURCE_SEED, i) for i in range(samples)]
        drawn = draw([s.caption for s in specs], [shapes.class_label(s) for s in specs], specs)

        def renders() -> torch.Tensor:
            images = np.stack([shapes.render(shapes.spec_for_index(REFERENCE_SEED, i)) for i in range(reference)])
            return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

        sets.append(("source", drawn, reference_features("source", reference, root, renders)))
        preview["source"] = to_uint8(drawn)
    scores = {"source_fid": math.nan, "source_kid_x1000": math.nan}
    for name, images, ref in sets:
        result = FIDScorer(net).set_reference(ref).score(images)
        scores[f"{name}_fid"], scores[f"{name}_kid_x1000"] = result["fid"], 1000 * result["kid_mean"]
        scores[f"{name}_reference"] = result["n_real"]
    scores["target_diversity"] = diversity(target, net)
    return scores | {"samples": samples, "sample_steps": steps, "guidance": guidance}, preview


def count_trainable(config: str, extra: list[str]) -> int:
    """Trainable parameters of the module the fit builds (LoRA and adapters included, frozen weights not)."""
    from lightning_ft.run import main

    cli = main([*config_args(config), *extra, "--trainer.logger=false"], run=False)  # as fit_run builds it
    return sum(p.numel() for p in cli.model.trainable_parameters())


def worker(command: list[str]) -> dict:
    """Run this module's hidden worker mode (scoring or counting) in a fresh single-threaded process; its JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmarks.domain_transfer", *command], check=True, env=env, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = Path(command[command.index("--json") + 1])
    result = json.loads(out.read_text())
    if "wall_seconds" not in result:  # CPU time: exact with --jobs 1 (one child at a time)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        result |= {"wall_seconds": time.perf_counter() - started, "cpu_seconds": cpu}
        out.write_text(json.dumps(result))
    return result


# ------------------------------------------------------------------------------------------------------ runs
def scores_path(run_root: Path, args, mask_rate: float | None, samples: int | None = None) -> Path:
    suffix = "" if mask_rate is None else f"_m{mask_rate:g}"
    return run_root / f"scores_n{samples or args.samples}_k{args.sample_steps}_g{args.guidance:g}{suffix}.json"


def score(run_root: Path, model: Path, loader: str, args, source: bool, mask_rate: float | None = None,
          samples: int | None = None, renders: str | None = None) -> dict:  # fmt: skip
    """The scores of one model (reused from ``run_root`` when already there with the sets asked for)."""
    samples = samples or args.samples
    out = scores_path(run_root, args, mask_rate, samples)
    if out.exists():
        scores = json.loads(out.read_text())
        if not source or math.isfinite(scores.get("source_fid", math.nan)):
            return scores
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ["--evaluate", str(model), "--loader", loader, "--json", str(out), "--samples", str(samples),
               "--reference", str(args.reference), "--sample-steps", str(args.sample_steps), "--guidance",
               str(args.guidance), "--root", str(args.root)]  # fmt: skip
    command += ["--mask-rate", str(mask_rate)] if mask_rate is not None else []
    command += [] if source else ["--no-source"]
    command += ["--renders", renders] if renders else []
    return worker(command)


def method_extra(method: str, args) -> list[str]:
    spec = METHODS[method]
    lr = [f"--model.init_args.lr={args.lr:g}"] if spec.full_lr and args.lr is not None else []
    return [*spec.extra, *lr, *device_overrides(args), *args.extra]


def run_settings(method: str, args) -> dict:
    spec = METHODS[method]
    return {"experiment": f"{MODELS[args.model][0]}/{spec.experiment}", "steps": args.steps,
            "overrides": [*FIT_OVERRIDES, *method_extra(method, args)]}  # fmt: skip


def run_root(method: str, seed: int | None, args) -> Path:
    return Path(args.root) / (method if seed is None else f"{method}/seed{seed}")


def finished_export(root: Path) -> Path | None:
    done = sorted(root.glob("lightning_logs/*/export/model_index.json"))
    return done[-1].parent if done else None


def fit(method: str, seed: int, args) -> tuple[Path, dict]:
    """The run's export and fit timing: reused when finished with the same settings, else fitted now."""
    root, settings = run_root(method, seed, args), run_settings(method, args)
    recorded = root / "settings.json"
    export = finished_export(root)
    if export is not None:
        if recorded.exists() and json.loads(recorded.read_text()) != settings:
            raise SystemExit(f"{root} holds a finished run with other settings ({recorded}); use another --root")
        timing = root / "fit_seconds.json"
        return export, json.loads(timing.read_text()) if timing.exists() else {}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    log_dir = fit_run(settings["experiment"], seed, args.steps, root, settings["overrides"])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"fit_seconds": time.perf_counter() - started,
              "fit_cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}  # fmt: skip
    (root / "fit_seconds.json").write_text(json.dumps(timing))
    recorded.write_text(json.dumps(settings))
    return log_dir / "export", timing


def trainable(method: str, args) -> int:
    out = Path(args.root) / method / "trainable.json"
    if not out.exists():
        settings = run_settings(method, args)
        out.parent.mkdir(parents=True, exist_ok=True)
        worker(["--count", settings["experiment"], "--json", str(out), "--", *settings["overrides"]])
    return json.loads(out.read_text())["trainable_params"]


def one_job(method: str, seed: int | None, args) -> list[dict]:
    """Fit (unless finished) and score one method and seed; ANL gives one row per mask rate."""
    label = {"plain": args.plain_name}
    if method in RENDER_ROWS:  # the floor and the autoencoder's ceiling: renders, no sampling
        from lightning_ft.embedded import asset_path

        model, loader = asset_path(MODELS[args.model][1]), METHODS["plain"].loader
        scores = score(run_root(method, None, args), model, loader, args, args.source, renders=method)
        return [{"method": RENDER_ROWS[method], "key": method, "mask_rate": None, "seed": None, **scores,
                 "trainable_params": None}]  # fmt: skip
    if method == "pretrained":
        from lightning_ft.embedded import asset_path

        model, loader = asset_path(MODELS[args.model][1]), METHODS["plain"].loader
        scores = score(run_root(method, None, args), model, loader, args, args.source)
        return [
            {
                "method": "no fine-tuning",
                "key": "pretrained",
                "mask_rate": None,
                "seed": None,
                **scores,
                "trainable_params": 0,
            }
        ]
    spec = METHODS[method]
    export, timing = fit(method, seed, args)
    common = {"seed": seed, "trainable_params": trainable(method, args), **timing}
    if spec.source:
        scores = score(run_root(method, seed, args), export, spec.loader, args, args.source)
        return [{"method": label.get(method, spec.name), "key": method, "mask_rate": None, **common, **scores}]
    # ANL: the main table's row at its default mask rate and --samples, then every --mask-rates value at
    # --mask-samples for the mask-rate table (same fitted model, same seeds and condition images per sample index)
    root = run_root(method, seed, args)
    main_row = {
        "method": f"{spec.name} (mask {ANL_MASK_RATE:g})",
        "key": method,
        "mask_rate": ANL_MASK_RATE,
        "mask_table": False,
        **common,
        **score(root, export, spec.loader, args, False, ANL_MASK_RATE),
    }
    return [main_row] + [
        {"method": f"{spec.name} (mask {m:g}, {args.mask_samples} samples)", "key": method, "mask_rate": m,
         "mask_table": True, **common, **score(root, export, spec.loader, args, False, m, args.mask_samples)}
        for m in args.mask_rates
    ]  # fmt: skip


def jobs_of(args) -> list[tuple[str, int | None]]:
    models = [(method, seed) for method in args.methods for seed in args.seeds]
    return [(name, None) for name in RENDER_ROWS] + [("pretrained", None)] + models


def expected_seconds(args) -> tuple[float, int, int]:
    """(seconds, fits, scorings) still to do, on one uncontended core (the calibration constants above)."""
    seconds, fits, scorings = 0.0, 0, 0
    bank_needed = "diff_tuning" in args.methods
    for method, seed in jobs_of(args):
        root = run_root(method, seed, args)
        if method in METHODS and finished_export(root) is None:
            fits += 1
            seconds += FIT_OVERHEAD_SECONDS + STEP_SECONDS.get(method, 0.3) * args.steps
            if method == "diff_tuning" and bank_needed:
                seconds, bank_needed = seconds + MEMORY_BANK_SECONDS, False
        source = args.source and (method not in METHODS or METHODS[method].source)
        scorings_of_job = [(None, args.samples)]
        if method in METHODS and not METHODS[method].source:  # ANL
            scorings_of_job = [(ANL_MASK_RATE, args.samples)] + [(m, args.mask_samples) for m in args.mask_rates]
        for m, samples in scorings_of_job:
            path = scores_path(root, args, m, samples)
            if path.exists() and (not source or math.isfinite(json.loads(path.read_text())["source_fid"])):
                continue
            scorings += 1
            per_sample = SAMPLE_STEP_SECONDS.get(method, SAMPLE_STEP_SECONDS_DEFAULT) * args.sample_steps
            per_sample = 0.002 if method in RENDER_ROWS else per_sample
            seconds += SCORE_OVERHEAD_SECONDS + per_sample * samples * (2 if source else 1)
    return seconds, fits, scorings


# ---------------------------------------------------------------------------------------------------- output
def _ci(summary: dict, key: str, digits: int = 2) -> str:
    return format_ci(summary[f"{key}_mean"], summary[f"{key}_ci"], digits)


def _diff(summary: dict, key: str) -> str:
    if not summary["seeds"]:
        return "-"
    return format_ci(summary[f"{key}_diff_mean"], summary[f"{key}_diff_ci"], 2, signed=True)


def forgetting_lines(summary: list[dict], baseline: str) -> list[str]:
    lines = [
        f"| method | seeds | target FID | target KID x1000 | target FID - {baseline} (paired) | source FID | "
        f"source KID x1000 | source FID - {baseline} (paired) | diversity | fit time (CPU s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['seeds'] or '-'} | {_ci(s, 'target_fid')} | {_ci(s, 'target_kid_x1000', 1)} | "
            f"{_diff(s, 'target_fid')} | {_ci(s, 'source_fid')} | {_ci(s, 'source_kid_x1000', 1)} | "
            f"{_diff(s, 'source_fid')} | {_ci(s, 'target_diversity', 3)} | {_ci(s, 'fit_cpu_seconds', 0)} |"
        )
    return lines


def peft_lines(summary: list[dict], baseline: str) -> list[str]:
    full = next((s["trainable_params"] for s in summary if s["method"] == baseline), None)
    lines = [
        f"| method | seeds | trainable params | % of {baseline} | fit time (CPU s) | target FID | target KID x1000 | "
        f"target FID - {baseline} (paired) | diversity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        share = f"{100 * s['trainable_params'] / full:.1f}%" if full and s["trainable_params"] else "-"
        params = "-" if s["trainable_params"] is None else f"{s['trainable_params']:,}"
        lines.append(
            f"| {s['method']} | {s['seeds'] or '-'} | {params} | {share} | {_ci(s, 'fit_cpu_seconds', 0)} | "
            f"{_ci(s, 'target_fid')} | {_ci(s, 'target_kid_x1000', 1)} | {_diff(s, 'target_fid')} | "
            f"{_ci(s, 'target_diversity', 3)} |"
        )
    return lines


def mask_rate_lines(rows: list[dict]) -> list[str]:
    """ANL's diversity and target FID against the mask rate (the ``mask_table`` rows), paired by seed with the
    lowest rate's rows."""
    anl = [r for r in rows if r.get("mask_table")]
    if not anl:
        return []
    rates = sorted(set(r["mask_rate"] for r in anl))
    first = [r for r in anl if r["mask_rate"] == rates[0]]
    name = f"mask {rates[0]:g}"
    lines = ["", f"ANL against the mask rate: one fitted ANL per seed, {first[0]['samples']} samples at each rate "
             f"(sample i: seed i, condition image i mod 32; FID of this many samples is not comparable with the table "
             f"above); differences paired by seed with {name}:", "",
             f"| mask rate | seeds | diversity | diversity - {name} (paired) | target FID | "
             f"target FID - {name} (paired) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for rate in rates:
        group = [r for r in anl if r["mask_rate"] == rate]
        cells = []
        for metric, digits in (("target_diversity", 4), ("target_fid", 2)):
            mean, half, _ = t_interval([r[metric] for r in group])
            d_mean, d_half, _ = t_interval(paired_differences(group, first, metric))
            cells += [format_ci(mean, half, digits), format_ci(d_mean, d_half, digits, True)]
        lines.append(f"| {rate:g} | {len(group)} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(rows: list[dict], out: Path, args) -> list[dict]:
    """``<out>.csv`` (every run), ``<out>_summary.csv`` and ``<out>.md`` (means with 95% t-intervals); returns the
    summary."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, f"{out}.csv")
    summary = summarise([r for r in rows if not r.get("mask_table")], args.plain_name)
    write_csv(summary, f"{out}_summary.csv")
    pretrained = next((r for r in rows if r["key"] == "pretrained"), {})
    source = "" if not args.source else (
        f" and {args.samples} for the captions of random source specs, against "
        f"{pretrained.get('source_reference', args.reference)} source renders (source)")  # fmt: skip
    lines = [
        f"Written by `{getattr(args, 'command', f'python -m benchmarks.domain_transfer --table {args.table}')}`. "
        f"Model `{MODELS[args.model][1]}`, {args.steps} steps per run (batch 16), seeds {args.seeds}; "
        f"{args.samples} samples per model and set ({args.sample_steps} DDIM steps, guidance {args.guidance:g}; "
        f"sample i has seed i): {args.samples} for the first held-out domain captions against "
        f"{pretrained.get('target_reference', 2000)} held-out domain images (target){source}. FID/KID with the "
        "embedded feature network; diversity = mean pairwise 1 - cosine of its features over the target samples. "
        "Mean ± half-width of the 95% Student-t interval over seeds; differences are paired by seed, with their "
        "own t-interval. Fit time = CPU seconds of the fit process (one thread; process start, loading and export "
        "included; Diff-Tuning's first fit also samples its memory bank).",
        "",
    ]
    lines += (forgetting_lines if args.table == "forgetting" else peft_lines)(summary, args.plain_name)
    lines += mask_rate_lines(rows)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def comparison_grid(rows: list[tuple[str, object]], path: Path, title: str, columns: str, split: int = 0) -> None:
    """Rows of uint8 images (N, 3, H, W), one labelled row each, as one PNG; ``split`` > 0 leaves a white gap
    after that many columns (target | source)."""
    import numpy as np
    import torch

    from lightning_ft.callbacks.sample_grid import make_grid

    width = max(len(images) for _, images in rows)
    strips = [make_grid(torch.as_tensor(images).float() / 255, width) for _, images in rows]
    h, w = strips[0].shape[0], strips[0].shape[1] // width
    if split:
        strips = [np.concatenate([s[:, : split * w], np.full((h, 8, 3), 255, np.uint8), s[:, split * w :]], 1)
                  for s in strips]  # fmt: skip
    image = np.concatenate([np.pad(s, ((0, 3), (0, 0), (0, 0)), constant_values=255) for s in strips])
    with saved_figure(path, 1, (3.2 + 0.62 * max(width, 12), 1.1 + 0.62 * len(rows)), dpi=120) as axis:
        axis.imshow(image, interpolation="nearest")
        axis.set_yticks([(h + 3) * i + h / 2 for i in range(len(rows))], [label for label, _ in rows], fontsize=8)
        axis.set_xticks([])
        axis.set_xlabel(columns, fontsize=8)
        axis.set_title(title, fontsize=8)


def write_grid(rows: list[dict], out: Path, args) -> None:
    """The pretrained model and each method's first seed on the same captions and seeds, under the real images."""
    import json as _json

    import numpy as np
    import torch

    from lightning_ft.data.folder import list_images, load_image
    from lightning_ft.embedded import shapes
    from lightning_ft.embedded.targets import ensure_target

    k = 8
    domain = ensure_target("domain")
    real_target = np.stack([np.asarray(load_image(f)) for f in list_images(domain / "heldout", "heldout")[:k]])
    real_source = np.stack([shapes.render(shapes.spec_for_index(SOURCE_SEED, i)) for i in range(k)])
    blank = np.zeros((k, 3, 32, 32), np.uint8)
    to_chw = lambda a: a.transpose(0, 3, 1, 2)  # noqa: E731
    with_source = args.source
    grid_rows = [("real images", np.concatenate([to_chw(real_target), to_chw(real_source)]) if with_source
                  else to_chw(real_target))]  # fmt: skip
    first_seed = args.seeds[0]
    for row in rows:
        if row["seed"] not in (None, first_seed):
            continue
        if row["key"] in RENDER_ROWS or (row["key"] == "anl" and not row.get("mask_table")):
            continue  # its first samples are the mask-rate table's row at the same rate
        path = scores_path(run_root(row["key"], row["seed"], args), args, row["mask_rate"], row["samples"])
        preview = torch.load(path.with_suffix(".preview.pt"))
        target = preview["target"][:k].numpy()
        source = preview["source"][:k].numpy() if "source" in preview else blank
        seed = "" if row["seed"] is None else f", seed {row['seed']}"
        grid_rows.append((f"{row['method']}{seed}", np.concatenate([target, source]) if with_source else target))
    export = finished_export(run_root("anl", first_seed, args)) if "anl" in args.methods else None
    if export is not None:  # the condition images the export samples from (its reference conditions, in [-1, 1])
        from safetensors.torch import load_file

        references = load_file(export / "anl_modules" / "anl.safetensors")["reference_conditions"][:k]
        conditions = ((references.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        pad = [blank] if with_source else []
        grid_rows.append((f"ANL's condition images 0-{k - 1}, seed {first_seed}", np.concatenate([conditions, *pad])))
    captions = [_json.loads(line)["caption"] for line in (domain / "heldout" / "captions.jsonl").read_text()
                .splitlines()[:k]]  # fmt: skip
    columns = "target: held-out captions 0-7 (ANL: its condition images 0-7)"
    if with_source:
        columns = "left: target, held-out captions 0-7; right: source, captions of source specs 0-7"
    shown = "; ".join(c.removeprefix("a ").removesuffix(" background") for c in captions[:4])
    title = f"column i: seed i, the same caption (ANL: condition image) in every row\ntarget captions: {shown}; ..."
    comparison_grid(grid_rows, Path(f"{out}_grid.png"), title, columns, split=k if with_source else 0)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=sorted(TABLES), default="forgetting")
    parser.add_argument("--model", choices=sorted(MODELS), default="t2i")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None)
    parser.add_argument(
        "--mask-rates",
        type=float,
        nargs="+",
        default=None,
        help="ANL's rates for its diversity table (default 0 0.5 0.75)",
    )
    parser.add_argument("--mask-samples", type=int, default=250, help="samples per rate in that table")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=None, help="lr of the full fine-tunes (plain, Diff-Tuning, "
                        "SDFT); default: the experiment files'")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--reference", type=int, default=2000)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=1)
    add_device_arguments(parser)
    parser.add_argument("--root", default=None)
    parser.add_argument("--extra", nargs="*", default=[], help="more CLI overrides for every run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--evaluate", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--count", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loader", default=METHODS["plain"].loader, help=argparse.SUPPRESS)
    parser.add_argument("--mask-rate", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-source", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--renders", choices=["renders", "round_trip"], default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(own)
    args.command = " ".join(["python -m benchmarks.domain_transfer", *own])
    if args.count:  # worker: trainable parameters of a fit's module
        Path(args.json).write_text(json.dumps({"trainable_params": count_trainable(args.count, rest)}))
        return []
    if args.evaluate:  # worker: score one model
        import torch

        from lightning_ft.callbacks.sample_grid import save_grid

        scores, preview = evaluate(args.evaluate, args.loader, args.samples, args.reference, args.sample_steps,
                                   args.guidance, args.mask_rate, not args.no_source, Path(args.root),
                                   args.renders)  # fmt: skip
        out = Path(args.json)
        torch.save(preview, out.with_suffix(".preview.pt"))
        save_grid(torch.cat(list(preview.values())).float() / 255, out.with_suffix(".png"), columns=8)
        out.write_text(json.dumps(scores))
        return [scores]
    methods, source, rates, plain_name = TABLES[args.table]
    args.methods = args.methods or methods
    args.mask_rates = args.mask_rates if args.mask_rates is not None else rates
    args.source, args.plain_name = source, plain_name
    args.root = args.root or str(REPO / "runs" / f"bench_domain_{args.model}")
    args.out = args.out or str(RESULTS / f"domain_transfer_{args.table}")

    seconds, fits, scorings = expected_seconds(args)
    print(f"domain_transfer --table {args.table}: {fits} fits and {scorings} scorings to do (finished ones reused); "
          f"expected run time about {seconds / 60:.0f} min on one uncontended core"
          f"{f' ({args.jobs} jobs)' if args.jobs > 1 else ''}", flush=True)  # fmt: skip
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = [row for rows in pool.map(lambda job: one_job(*job, args), jobs_of(args)) for row in rows]
    write_outputs(rows, Path(args.out), args)
    write_grid(rows, Path(args.out), args)
    print(f"domain_transfer --table {args.table}: done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return rows


if __name__ == "__main__":
    main()
