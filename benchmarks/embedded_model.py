"""Quality of an embedded pretrained model: prompt (or class) accuracy per attribute and FID/KID.

Samples ``--samples`` captions of random source-domain specs, generates one image per caption (seed = index),
classifies each with the embedded feature network (prompt accuracy: does the image show the prompted shape,
colour and background) and scores FID/KID against ``--reference`` held-out source renders. A class-conditional
model (the DiT) is given each spec's class (shape x colour) instead, so its background accuracy is not scored.
Two reference rows bound the numbers: fresh renders (the floor: same distribution) and the VAE round trip of fresh
renders (what the autoencoder alone costs).

To run: python -m benchmarks.embedded_model [--model lightning_ft/embedded/assets/shapes-dit] [--samples 512]
Writes benchmarks/results/embedded_model.{md,csv} (the text-to-image model) or embedded_<model folder>.{md,csv},
and a sample grid.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.tables import write_csv
from lightning_ft.callbacks.sample_grid import save_grid
from lightning_ft.core import DiffusionBase
from lightning_ft.embedded import asset_path, shapes
from lightning_ft.embedded.feature_net import default_feature_net
from lightning_ft.embedded.prompts import prompt_accuracy
from lightning_ft.metrics import FIDScorer

RESULTS = Path(__file__).resolve().parent / "results"


def renders(seed: int, count: int) -> tuple[torch.Tensor, list[str]]:
    specs = [shapes.spec_for_index(seed, i) for i in range(count)]
    images = np.stack([shapes.render(s) for s in specs])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, [s.caption for s in specs]


def percent(value: float) -> str:
    return "n/a" if value != value else f"{value:.1%}"  # NaN: the attribute was not asked for


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(asset_path("shapes-t2i")))
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--reference", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    name = Path(args.model).name
    args.out = args.out or str(RESULTS / ("embedded_model" if name == "shapes-t2i" else f"embedded_{name}"))

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    module = DiffusionBase(pretrained=args.model)
    net = default_feature_net()
    reference, _ = renders(4242, args.reference)
    scorer = FIDScorer(net).set_reference(reference)
    fresh, captions = renders(args.seed, args.samples)
    class_model = module.family.needs_labels()
    labels = [shapes.class_label(shapes.spec_for_index(args.seed, i)) for i in range(args.samples)]
    # What the model was asked for: a class names shape and colour only.
    asked = [shapes.class_name(label) for label in labels] if class_model else captions

    rows = []

    def add(name: str, images: torch.Tensor, prompts: list[str], seconds: float | None = None) -> None:
        accuracy = prompt_accuracy(images, prompts, net)
        fid = scorer.score(images)
        rows.append(
            {
                "images": name,
                "n": len(images),
                "shape": accuracy["shape"],
                "color": accuracy["color"],
                "background": accuracy["background"],
                "fid": fid["fid"],
                "kid_x1000": 1000 * fid["kid_mean"],
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)

    add("source renders (floor)", fresh, captions)
    if module.vae is not None:
        add("VAE round trip of renders", module.round_trip(fresh), captions)
    for guidance in args.guidance:
        start = time.perf_counter()
        conditions = {"labels": labels} if class_model else {"prompts": captions}
        samples = module.generate(
            **conditions, seeds=list(range(len(captions))), steps=args.steps, guidance_scale=guidance, batch_size=64
        )
        add(f"samples, {args.steps} DDIM steps, guidance {guidance}", samples, asked, time.perf_counter() - start)
        save_grid(samples[:64], f"{args.out}_samples_g{guidance}.png", columns=8)

    out = Path(args.out)
    write_csv(rows, f"{out}.csv")
    lines = [
        f"Embedded model `{name}`: {args.samples} {'classes' if class_model else 'captions'} of random source specs "
        f"(seed {args.seed}), one sample each; FID/KID vs {args.reference} held-out renders, embedded feature net.",
        "",
        "| images | n | shape acc | colour acc | background acc | FID | KID x1000 | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seconds = f"{r['seconds']:.0f}" if r["seconds"] is not None else ""
        lines.append(
            f"| {r['images']} | {r['n']} | {r['shape']:.1%} | {r['color']:.1%} | {percent(r['background'])} | "
            f"{r['fid']:.2f} | {r['kid_x1000']:.2f} | {seconds} |"
        )
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
