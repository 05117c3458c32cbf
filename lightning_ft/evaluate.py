"""``python -m lightning_ft.evaluate RUN_OR_EXPORT``: DreamBench-style evaluation of a fine-tuned model.

Samples N prompts x M images (default: the data config's ``sample_prompts``, the recontextualisation prompts; else
its instance prompt; or ``--prompts FILE``) and scores them as DreamBooth does: subject fidelity, the mean cosine
similarity of each sample's identity embedding to every reference's (the model's declared identity backbone:
DINO ViT-S/16 for a real model, the feature network for the embedded world), and CLIP-I where a CLIP model is
available; prompt fidelity, CLIP-T (or the embedded world's prompt accuracy). Each per prompt and overall, with its
count and 95% t-interval over samples, and a "real images" row: the references against each other (leave-one-out),
the ceiling. References: ``--references DIR``, else the data's ``heldout_dir``, else its ``instance_dir``.

Writes ``evaluation.md``, ``evaluation.json`` and ``grid.png`` into ``--out`` (default: ``RUN/evaluation/``, and the
run's ``report.html`` is written again with an evaluation panel; for an export alone ``<export>_evaluation/``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from lightning_ft.evaluation import output
from lightning_ft.evaluation.scoring import make_scorers
from lightning_ft.evaluation.source import choose_prompts, choose_references, load_model, resolve_target
from lightning_ft.evaluation.statistics import INTERVAL
from lightning_ft.metrics.backbones import declared_backbones
from lightning_ft.report.evaluation import EVALUATION_DIR, METRICS, table
from lightning_ft.report.run_report import display_name, write_run_report

DEFAULT_IMAGES = 4  # DreamBooth's protocol: 25 prompts x 4 images per subject


def parse(argv: list[str] | None) -> argparse.Namespace:
    _, description, writes = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m lightning_ft.evaluate", description=description, epilog=writes,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("path", metavar="RUN_OR_EXPORT", help="a run folder (config.yaml and export/) or an export folder")
    p.add_argument("--prompts", metavar="FILE", help="prompt file, one per line (default: the run's "
                   "data.sample_prompts, the recontextualisation prompts; else data.instance_prompt)")  # fmt: skip
    p.add_argument("--images-per-prompt", type=int, default=None, metavar="M",
                   help=f"samples per prompt (default {DEFAULT_IMAGES}, or as many as --seeds)")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", help="the seeds of each prompt's samples (default 0..M-1)")
    p.add_argument("--references", metavar="DIR", help="reference images of the subject (default: the run's "
                   "data.heldout_dir, else data.instance_dir, the training images)")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="output folder (default: RUN/evaluation, or <export>_evaluation)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the run's model.sample_steps)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the run's model.guidance_scale)")
    p.add_argument("--backbone", default="auto", help="identity backbone (default auto: the model's declared one, "
                   "else dino); or dino, dinov2, clip, package.module:function")  # fmt: skip
    p.add_argument("--backbone-path", help="folder or hub id of the identity backbone's weights")
    p.add_argument(
        "--clip",
        metavar="PATH",
        help="full CLIP model (folder or hub id) for CLIP-I and CLIP-T "
        "(default: the model's declared one; a real model that declares none: the papers' ViT-L/14)",
    )
    p.add_argument("--no-clip", action="store_true", help="score no CLIP-I / CLIP-T (e.g. offline)")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampling batch (default 8)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-report", action="store_true", help="do not write the run's report.html again")
    return p.parse_args(argv)


def _seeds(images_per_prompt: int | None, seeds: list[int] | None) -> list[int]:
    if seeds is None:
        count = DEFAULT_IMAGES if images_per_prompt is None else images_per_prompt
        if count < 1:
            raise ValueError(f"--images-per-prompt must be at least 1, got {count}")
        return list(range(count))
    if images_per_prompt is not None and images_per_prompt != len(seeds):
        raise ValueError(f"--images-per-prompt {images_per_prompt} but {len(seeds)} --seeds")
    return list(seeds)


def evaluate(args: argparse.Namespace, command: str) -> dict:
    """Run the evaluation ``args`` (``parse``) describe; returns the result (as in ``evaluation.json``) with the
    paths written under ``"written"``."""
    seeds = _seeds(args.images_per_prompt, args.seeds)
    target = resolve_target(args.path)
    prompts, prompts_from = choose_prompts(target, args.prompts)
    references = choose_references(target, args.references)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.out:
        out = Path(args.out)
    else:
        out = target.run / EVALUATION_DIR if target.run else target.export.with_name(f"{target.export.name}_evaluation")
    scorers = make_scorers(declared_backbones(target.export), args.backbone, args.backbone_path, args.clip,
                           args.no_clip, device)  # fmt: skip

    module = load_model(target, device)
    steps = args.steps or module.hparams.sample_steps
    guidance = module.hparams.guidance_scale if args.guidance is None else args.guidance
    inputs = module.family.sample_inputs(prompts, None, where="lightning_ft.evaluate (prompts)")
    if inputs.prompts is None:
        raise ValueError(f"{target.export}: the model reads no prompts ({module.family.describe()}); "
                         "lightning_ft.evaluate scores text-to-image models")  # fmt: skip
    sample_prompts = [p for p in prompts for _ in seeds]
    with torch.random.fork_rng(devices=[]):
        samples = module.generate(**inputs.each(len(seeds)).generate_kwargs(), seeds=seeds * len(prompts),
                                  steps=steps, guidance_scale=guidance, batch_size=args.batch_size)  # fmt: skip
    size = samples.shape[-1]
    real = references.pixels(size)
    scores = scorers.score(samples, sample_prompts, real)
    instance_prompt = target.data.get("instance_prompt")
    real_scores = scorers.score_references(real, instance_prompt, references.key)
    rows, overall = output.score_rows(scores, prompts, len(seeds), scorers.bounds)

    labels = {"subject_fidelity": f"subject fidelity ({scorers.identity.name})",
              "clip_i": "CLIP-I" if scorers.clip is not None else None,
              "prompt_fidelity": scorers.prompt_metric}  # fmt: skip
    result = {
        "title": display_name(target.run) if target.run else target.export.name,
        "model": str(target.export),
        "run": str(target.run) if target.run else None,
        "command": command,
        "prompts_from": prompts_from,
        "references": {
            "description": references.description,
            "key": references.key,
            "folder": str(references.folder),
            "n": len(references.files),
        },
        "settings": {
            "images_per_prompt": len(seeds),
            "seeds": seeds,
            "steps": steps,
            "guidance_scale": guidance,
            "resolution": size,
            "device": str(device),
        },
        "metrics": labels,
        "backbones": {
            "subject_fidelity": scorers.identity_text,
            "clip": scorers.clip_text,
            "prompt_fidelity": scorers.prompt_text,
        },
        "interval": INTERVAL,
        "rows": rows,
        "overall": overall,
        "real_images": output.reference_row(real_scores, len(references.files), instance_prompt, scorers.bounds),
        "notes": [*scorers.notes, _real_images_note(len(references.files), instance_prompt, scorers)],
        "per_sample": {m: None if scores[m] is None else [float(v) for v in scores[m]] for m in METRICS},
    }
    grid = output.grid_image(samples, prompts, len(seeds), f"seeds {', '.join(map(str, seeds))}")
    result["written"] = output.write_outputs(out, result, grid)
    if target.run and not args.no_report and out.resolve() == (target.run / EVALUATION_DIR).resolve():
        try:
            result["written"]["report"] = write_run_report(target.run)
        except Exception as error:  # the evaluation is written: a report that fails to draw is a warning
            print(f"lightning-ft evaluate: warning: report.html not rewritten ({type(error).__name__}: {error})",
                  file=sys.stderr)  # fmt: skip
    return result


def _real_images_note(n: int, instance_prompt: str | None, scorers) -> str:
    text = f"Real images: each of the {n} references against the other {n - 1} (leave-one-out), the ceiling"
    if scorers.prompt_metric is None:
        return text + "."
    if instance_prompt:
        return text + f"; their prompt fidelity against the instance prompt {instance_prompt!r}."
    return text + "; no prompt fidelity (no instance prompt: an export without its run's config)."


def summary(result: dict) -> str:
    """What the command prints: what was sampled and scored, the table, the files."""
    header, rows = table(result)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"lightning-ft evaluate: {result['model']}",
             f"  prompts: {len(result['rows'])} from {result['prompts_from']}; "
             f"{result['settings']['images_per_prompt']} images each, {result['settings']['steps']} steps",
             f"  references: {result['references']['description']}",
             f"  subject fidelity: {result['backbones']['subject_fidelity']}",
             *[f"  {note}" for note in result["notes"]],
             f"  intervals: {result['interval']}",
             "  " + "  ".join(h.ljust(w) for h, w in zip(header, widths))]  # fmt: skip
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines += [f"  {what}: {path}" for what, path in result.get("written", {}).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    try:
        result = evaluate(args, "python -m lightning_ft.evaluate " + shlex.join(argv))
    except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as error:
        print(f"lightning-ft evaluate: {error}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
