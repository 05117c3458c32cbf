"""Why the main job's subject stays on its training background: the shipped subject (5 renders, all on gray) against
the same 5 poses rendered on two backgrounds (gray and black), navy never shown.

Each arm is the main job (``experiments/dreambooth_bnn.yaml`` with ``configs/data/embedded_subject.yaml``, 300
steps), the second with ``--data.instance_dir`` set to the two-background renders, each captioned with its own
background in a ``.txt`` file (``a sks orange star on a black background``). Both exports are then sampled for the
instance token on every background and for the class prompt, and scored per background: subject identity (the
identity role, against the shipped subject's 5 instance images), progress from the class prior to the ceiling, the
feature network's share of striped samples and of the prompted background; the class prompt's share of plain
samples. The levels (class prior, ceiling) are those of ``benchmarks/embedded_world.py``.

To run: python -m benchmarks.recontext [--seeds 0] [--count 48]   (about 2 x 2 min of fits and 1 min of scoring
per seed on 2 free cores). Writes benchmarks/results/recontext.{md,csv} and recontext_grid.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.embedded_world import load_folder
from benchmarks.launch import fit_run
from benchmarks.tables import markdown_table, write_csv
from lightning_ft.callbacks.sample_grid import save_grid
from lightning_ft.core import DiffusionBase
from lightning_ft.embedded import asset_path, shapes, targets
from lightning_ft.embedded.backbones import identity
from lightning_ft.embedded.feature_net import default_feature_net
from lightning_ft.embedded.prompts import prompt_accuracy
from lightning_ft.metrics import features, subject_fidelity

RESULTS = Path(__file__).resolve().parent / "results"
EXPERIMENT = "experiments/dreambooth_bnn.yaml"
#: The two-background arm: the shipped subject's poses, on these backgrounds in turn (navy is never shown).
TRAIN_BACKGROUNDS = ("gray", "black")


def write_two_backgrounds(folder: Path, count: int = 5) -> Path:
    """The subject's ``count`` training poses (``targets.write_subject``'s draws) rendered on gray and black in turn,
    each with a ``.txt`` caption naming its background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((0, 1))  # write_subject's generator: the same poses as the shipped renders
    for i in range(count):
        background = TRAIN_BACKGROUNDS[i % len(TRAIN_BACKGROUNDS)]
        spec = targets.subject_spec(rng, background=background)
        Image.fromarray(shapes.render(spec, 32)).save(folder / f"subject_{i:02d}.png")
        (folder / f"subject_{i:02d}.txt").write_text(f"a sks orange star on a {background} background")
    return folder


@torch.no_grad()
def score(export: Path, arm: str, seed: int, count: int, levels: dict, ref: torch.Tensor, net, ident) -> tuple:
    """Rows per background (and the class prompt) of one arm's export; the images, for the grid."""
    model = DiffusionBase(pretrained=str(export))
    seeds = list(range(count))
    rows, grid = [], []
    for background in shapes.BACKGROUNDS:
        prompt = f"a sks orange star on a {background} background"
        images = model.generate(prompts=[prompt] * count, seeds=seeds, steps=25, guidance_scale=2.0, batch_size=64)
        fidelity = subject_fidelity(features(images, ident), ref)
        predicted = net.predict(images)
        striped = float((predicted["pattern"] == net.label_names["pattern"].index("striped")).float().mean())
        shown = "trained" if arm == "two backgrounds" and background in TRAIN_BACKGROUNDS else (
            "trained" if background == "gray" else "new")  # fmt: skip
        rows.append({"arm": arm, "seed": seed, "prompt": prompt, "background": f"{background} ({shown})",
                     "n": count, "identity": fidelity,
                     "progress": (fidelity - levels["prior"]) / (levels["ceiling"] - levels["prior"]),
                     "striped": striped, "background_acc": prompt_accuracy(images, [prompt] * count, net)["background"],
                     "plain": None})  # fmt: skip
        grid.append(images[:8])
    prompt = targets.SUBJECT_CLASS_PROMPT
    images = model.generate(prompts=[prompt] * count, seeds=seeds, steps=25, guidance_scale=2.0, batch_size=64)
    plain = float((net.predict(images)["pattern"] == net.label_names["pattern"].index("plain")).float().mean())
    rows.append({"arm": arm, "seed": seed, "prompt": prompt, "background": "gray (class prompt)", "n": count,
                 "identity": subject_fidelity(features(images, ident), ref), "progress": None, "striped": None,
                 "background_acc": None, "plain": plain})  # fmt: skip
    grid.append(images[:8])
    return rows, torch.cat(grid)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--count", type=int, default=48, help="samples per prompt")
    parser.add_argument("--root", default="runs/recontext")
    parser.add_argument("--out", default=str(RESULTS / "recontext"))
    args = parser.parse_args(argv)
    print(f"benchmarks.recontext: expected about {len(args.seeds) * 5} min on 2 free cores "
          f"({len(args.seeds)} seed(s) x 2 fits of 300 steps, then scoring)", flush=True)  # fmt: skip
    start = time.perf_counter()
    root = Path(args.root)
    two = write_two_backgrounds(root / "two_backgrounds")
    subject = targets.ensure_target("subject")
    net, ident = default_feature_net(), identity()
    ref = features(load_folder(subject / "train"), ident)
    # The levels of benchmarks/embedded_world.py: the class prior and the ceiling, on the same seeds and count.
    pretrained = DiffusionBase(pretrained=str(asset_path("shapes-t2i")))
    seeds = list(range(args.count))
    with torch.no_grad():
        prior_images = pretrained.generate(prompts=[targets.SUBJECT_CLASS_PROMPT] * args.count, seeds=seeds,
                                           steps=25, guidance_scale=2.0, batch_size=64)  # fmt: skip
        ceiling_images = pretrained.round_trip(load_folder(subject / "heldout", args.count))
    levels = {"prior": subject_fidelity(features(prior_images, ident), ref),
              "ceiling": subject_fidelity(features(ceiling_images, ident), ref)}  # fmt: skip
    rows, grids = [], []
    for seed in args.seeds:
        for arm, extra in (("shipped subject (gray only)", []),
                           ("two backgrounds", ["--data.instance_dir", str(two), "--data.instance_prompt", "null"])):
            folder = root / f"{arm.split(' ')[0]}_seed{seed}"
            log_dir = fit_run(EXPERIMENT, seed, 300, folder, extra)
            arm_rows, images = score(log_dir / "export", arm, seed, args.count, levels, ref, net, ident)
            rows += arm_rows
            grids.append(images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, f"{out}.csv")
    save_grid(torch.cat(grids[:2]), f"{out}_grid.png", columns=8)
    columns = ["arm", "seed", "background", "n", "identity", "progress", "striped", "prompted background",
               "class plain"]  # fmt: skip
    shown = [{"arm": r["arm"], "seed": r["seed"], "background": r["background"], "n": r["n"],
              "identity": f"{r['identity']:.3f}",
              "progress": "" if r["progress"] is None else f"{r['progress']:.2f}",
              "striped": "" if r["striped"] is None else f"{r['striped']:.1%}",
              "prompted background": "" if r["background_acc"] is None else f"{r['background_acc']:.1%}",
              "class plain": "" if r["plain"] is None else f"{r['plain']:.1%}"} for r in rows]  # fmt: skip
    table = "\n".join(markdown_table(shown, columns))
    minutes = (time.perf_counter() - start) / 60
    text = [
        "# The subject in new contexts: one training background against two",
        "",
        f"Levels ({args.count} samples each): class prior {levels['prior']:.3f} (the pretrained model's class-prompt "
        f"samples), ceiling {levels['ceiling']:.3f} (autoencoder round trips of held-out subject renders); progress "
        "= (identity - prior) / (ceiling - prior). Identity against the shipped subject's 5 instance images (gray).",
        "",
        table,
        "",
        f"Command: `python -m benchmarks.recontext --seeds {' '.join(map(str, args.seeds))} --count {args.count}`; "
        f"{minutes:.1f} min. Samples: 25 DDIM steps, guidance 2, seeds 0-{args.count - 1}. Grid "
        "(`recontext_grid.png`, first seed): per arm, the instance token on black, gray and navy, then the class "
        "prompt, 8 samples each.",
        "",
    ]
    Path(f"{out}.md").write_text("\n".join(text))
    print("\n".join(text))
    (Path(f"{out}.json")).write_text(json.dumps({"levels": levels, "rows": rows}, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
