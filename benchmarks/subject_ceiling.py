"""The best subject fidelity a latent model can reach: held-out renders of the embedded subject, as they are and
after a round trip through the model's autoencoder, scored against the instance images.

A latent diffusion model can only produce what its autoencoder decodes, so the round trip bounds what any
fine-tuning method can score on the subject.

To run: python -m benchmarks.subject_ceiling [--count 64]
Writes benchmarks/results/subject_ceiling.md and a grid (top row renders, bottom row round trips).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_ft.callbacks.sample_grid import save_grid
from lightning_ft.core import DiffusionBase
from lightning_ft.data.targets import ensure_target
from lightning_ft.metrics import memorisation, subject_fidelity
from lightning_ft.paths import asset_path

RESULTS = Path(__file__).resolve().parent / "results"


def load_folder(folder: Path, count: int | None = None) -> torch.Tensor:
    files = sorted(folder.glob("*.png"))[:count]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(asset_path("shapes-t2i")))
    parser.add_argument("--vae", default=None, help="an AutoencoderKL folder to judge instead of the model's")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "subject_ceiling"))
    args = parser.parse_args(argv)

    subject = ensure_target("subject")
    instances, heldout = load_folder(subject / "train"), load_folder(subject / "heldout", args.count)
    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae)
    else:
        vae = DiffusionBase(pretrained=args.model).vae
    round_trip = (vae.decode(vae.encode(heldout * 2 - 1).latent_dist.mode()).sample / 2 + 0.5).clamp(0, 1)
    rows = [
        {"images": "held-out subject renders", "fidelity": subject_fidelity(heldout, instances),
         "memorisation": memorisation(heldout, instances)},
        {"images": "their VAE round trip", "fidelity": subject_fidelity(round_trip, instances),
         "memorisation": memorisation(round_trip, instances)},
    ]  # fmt: skip
    lines = [
        f"{len(heldout)} held-out renders of the embedded subject vs its {len(instances)} instance images "
        f"(embedded feature network); autoencoder {args.vae or Path(args.model).name}.",
        "",
        "| images | subject fidelity | memorisation |",
        "|---|---|---|",
        *[f"| {r['images']} | {r['fidelity']:.3f} | {r['memorisation']:.3f} |" for r in rows],
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    save_grid(torch.cat([heldout[:8], round_trip[:8]]), f"{args.out}.png", columns=8)
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
