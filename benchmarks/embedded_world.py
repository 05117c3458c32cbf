"""The embedded world's table: does the autoencoder hold the subject, does the pretrained model follow its prompts,
and where does subject identity put the class prior, the main job's samples and the ceiling.

Three parts, each row with its sample count:

1. Autoencoder: PSNR of the round trip of held-out subject renders and of plain source renders, and how often the
   feature network still names the shape (and, for the subject, the stripes) after the round trip.
2. Pretrained model: prompt accuracy (shape, colour, background) and FID at guidance 2 (``benchmarks.embedded_model``).
3. Subject identity (cosine of identity embeddings to the 5 instance images, the DINO role): held-out subject
   renders, plain renders of its class, their round trips (the ceiling), the pretrained model's class-prompt
   samples (the class prior) and, with ``--run``, the main job's samples: the instance prompt (identity and
   progress from prior to ceiling) on each background (those of its training images and navy, which they never
   show; background accuracy) and the class prompt (do its samples stay plain).

To run: python -m benchmarks.embedded_world [--run runs/dreambooth_bnn/lightning_logs/version_0] [--samples 512]
Writes benchmarks/results/embedded_world.{md,csv} and a grid per sample set (embedded_world_*.png).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks import embedded_model
from benchmarks.tables import markdown_table, write_csv
from lightning_ft.callbacks.sample_grid import save_grid
from lightning_ft.core import DiffusionBase
from lightning_ft.data.folder import list_images, load_image
from lightning_ft.embedded import asset_path, shapes, targets
from lightning_ft.embedded.backbones import identity
from lightning_ft.embedded.feature_net import default_feature_net
from lightning_ft.embedded.prompts import prompt_accuracy
from lightning_ft.metrics import features, subject_fidelity

RESULTS = Path(__file__).resolve().parent / "results"


def load_folder(folder: Path, count: int | None = None) -> torch.Tensor:
    """The first ``count`` images of ``folder`` (the project's reader: sorted, RGB, EXIF-upright) in [0, 1]."""
    files = list_images(folder, str(folder))[:count]
    return torch.stack([torch.from_numpy(np.asarray(load_image(f))).permute(2, 0, 1) for f in files]).float() / 255


def render(specs: list[shapes.ShapeSpec]) -> torch.Tensor:
    return torch.from_numpy(np.stack([shapes.render(s) for s in specs])).permute(0, 3, 1, 2).float() / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB) of images in [0, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((-10 * torch.log10(mse)).mean())


def plain_class_specs(count: int, seed: int) -> list[shapes.ShapeSpec]:
    """The subject's class without its pattern: plain orange stars on gray, posed like the subject renders."""
    rng = np.random.default_rng((seed, 5))
    return [targets.subject_spec(rng, stripes=None) for _ in range(count)]


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(asset_path("shapes-t2i")))
    parser.add_argument("--run", default=None, help="a main-job log folder (version_N) whose export/ is scored")
    parser.add_argument("--samples", type=int, default=512, help="captions for the pretrained model's quality")
    parser.add_argument("--count", type=int, default=64, help="images per identity row and per sample set")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--skip-quality", action="store_true", help="leave out part 2 (the slowest)")
    parser.add_argument("--out", default=str(RESULTS / "embedded_world"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    pretrained = DiffusionBase(pretrained=args.model)
    net, ident = default_feature_net(), identity()
    subject = targets.ensure_target("subject")
    meta = json.loads((subject / "meta.json").read_text())
    instances = load_folder(subject / "train")
    heldout = load_folder(subject / "heldout", args.count)
    ref = features(instances, ident)
    rows: list[dict] = []

    def predicted(images: torch.Tensor, head: str, name: str) -> float:
        return float((net.predict(images)[head] == net.label_names[head].index(name)).float().mean())

    # 1. the autoencoder
    plain_specs = [shapes.spec_for_index(31, i) for i in range(args.count * 4)]
    plain = render(plain_specs)
    shape = meta["subject"]["shape"]
    rows.append(
        {
            "part": "autoencoder",
            "images": "held-out subject renders (no round trip)",
            "n": len(heldout),
            "shape_acc": predicted(heldout, "shape", shape),
            "striped": predicted(heldout, "pattern", "striped"),
        }
    )
    subject_trip = pretrained.round_trip(heldout)  # also the ceiling of part 3
    rows.append({"part": "autoencoder", "images": "round trip of held-out subject renders", "n": len(heldout),
                 "psnr_db": psnr(subject_trip, heldout), "shape_acc": predicted(subject_trip, "shape", shape),
                 "striped": predicted(subject_trip, "pattern", "striped")})  # fmt: skip
    plain_trip = pretrained.round_trip(plain)
    truth = torch.tensor([shapes.SHAPES.index(s.shape) for s in plain_specs])
    rows.append({"part": "autoencoder", "images": "round trip of plain source renders", "n": len(plain),
                 "psnr_db": psnr(plain_trip, plain),
                 "shape_acc": float((net.predict(plain_trip)["shape"] == truth).float().mean()),
                 "striped": predicted(plain_trip, "pattern", "striped")})  # fmt: skip
    save_grid(torch.cat([heldout[:8], subject_trip[:8]]), f"{out}_round_trip.png", columns=8)

    # 2. the pretrained model's prompt accuracy and FID
    if not args.skip_quality:
        quality = embedded_model.main(
            ["--model", args.model, "--samples", str(args.samples), "--guidance", str(args.guidance),
             "--steps", str(args.steps), "--out", f"{out}_quality"]
        )  # fmt: skip
        for r in quality:
            rows.append({"part": "pretrained model", **{k: v for k, v in r.items() if k != "seconds"}})

    # 3. subject identity
    seeds = list(range(args.count))

    def sample(module: DiffusionBase, prompt: str) -> torch.Tensor:
        return module.generate(
            prompts=[prompt] * len(seeds), seeds=seeds, steps=args.steps, guidance_scale=args.guidance, batch_size=64
        )

    def add_identity(name: str, images: torch.Tensor, **extra) -> float:
        score = subject_fidelity(features(images, ident), ref)
        rows.append({"part": "subject identity", "images": name, "n": len(images), "identity": score, **extra})
        return score

    plain_class = render(plain_class_specs(args.count, 0))
    add_identity("held-out subject renders", heldout)
    add_identity(f"plain renders of its class ({meta['class_prompt']!r})", plain_class)
    ceiling = add_identity("round trip of held-out subject renders (ceiling)", subject_trip)
    prior_images = sample(pretrained, meta["class_prompt"])
    prior = add_identity("pretrained model, class prompt (class prior)", prior_images)
    rows[-1]["plain"] = predicted(prior_images, "pattern", "plain")
    rows[-1]["shape_acc"] = predicted(prior_images, "shape", meta["subject"]["shape"])
    before = sample(pretrained, meta["instance_prompts"][0])
    add_identity("pretrained model, instance prompt", before)
    save_grid(prior_images[:16], f"{out}_class_prior.png", columns=8)
    if args.run:
        export = Path(args.run) / "export"
        tuned = DiffusionBase(pretrained=str(export))
        grid = []
        # The instance token on every background: those its training images show, and navy, which they never do.
        for prompt in meta["eval_prompts"]:
            images = sample(tuned, prompt)
            where = "trained" if prompt in meta["instance_prompts"] else "new"
            background = prompt_accuracy(images, [prompt] * len(images), net)["background"]
            score = add_identity(f"main job ({args.run}), {prompt!r} ({where} background)", images,
                                 background_acc=background)  # fmt: skip
            rows[-1]["progress"] = (score - prior) / (ceiling - prior)
            rows[-1]["striped"] = predicted(images, "pattern", "striped")
            rows[-1]["shape_acc"] = predicted(images, "shape", meta["subject"]["shape"])
            grid.append(images[:8])
        cls = sample(tuned, meta["class_prompt"])
        add_identity("main job, class prompt", cls, plain=predicted(cls, "pattern", "plain"))
        rows[-1]["shape_acc"] = predicted(cls, "shape", meta["subject"]["shape"])
        save_grid(torch.cat([*grid, cls[:8]]), f"{out}_main_job.png", columns=8)

    write_csv(rows, f"{out}.csv")
    lines = [
        f"# The embedded world (`{Path(args.model).name}`; subject: "
        f"{' / '.join(repr(p) for p in meta['instance_prompts'])})",
        "",
        "Identity is the mean cosine of identity embeddings (the identity backbone the model declares: "
        f"`{ident.name}`) to the {len(instances)} instance images; progress = (identity - class prior) / (ceiling - "
        f"class prior). Samples: {args.steps} sampler steps, guidance {args.guidance}, seeds 0-{args.count - 1}. "
        "Shape, striped, colour and background: the attribute heads of the feature network `shapes-features`. Main "
        "job rows (with `--run`): the instance token on each background (the grid `embedded_world_main_job.png`: 8 "
        "samples per row in this order, then the class prompt).",
        "",
    ]

    def cell(row: dict, keys: tuple[str, ...], fmt: str) -> str:
        value = next((row[k] for k in keys if row.get(k) is not None), None)
        return "" if value is None else "n/a" if value != value else format(value, fmt)

    columns = {  # heading: (row keys, first one present, and its format)
        "part": (("part",), ""), "images": (("images",), ""), "n": (("n",), ""), "PSNR (dB)": (("psnr_db",), ".1f"),
        "shape": (("shape_acc", "shape"), ".1%"), "striped": (("striped",), ".1%"), "colour": (("color",), ".1%"),
        "background": (("background_acc", "background"), ".1%"), "FID": (("fid",), ".2f"),
        "identity": (("identity",), ".3f"), "progress": (("progress",), ".2f"), "plain": (("plain",), ".1%"),
    }  # fmt: skip
    table = [{name: cell(r, keys, fmt) for name, (keys, fmt) in columns.items()} for r in rows]
    lines += markdown_table(table, list(columns))
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
