"""Why a subject must be shown in more than one context: the shipped subject (5 renders, 3 on gray and 2 on black, each
captioned with its background) against the same 5 poses all on gray (the subject as it shipped up to target version
4), navy never shown to either.

Each arm is the main job (``experiments/dreambooth_bnn.yaml`` with ``configs/data/embedded_subject.yaml``, 300
steps), the gray-only arm with ``--data.instance_dir`` set to the one-background renders, each captioned
``a sks orange star on a gray background`` in a ``.txt`` file. Both exports are then sampled for the instance token on
every background and for the class prompt, and scored per background: subject identity (the identity role, against
the shipped subject's 5 instance images), progress from the class prior to the ceiling, the feature network's share
of striped samples and of the prompted background; the class prompt's share of plain samples. The levels (class prior,
ceiling) are those of ``benchmarks/embedded_world.py``. Per arm and background, the mean over seeds with a 95%
t-interval.

To run: python -m benchmarks.recontext [--seeds 0 1 2] [--count 48]   (about 2 x 3 min of fits and 1 min of scoring
per seed on 2 free cores). Writes benchmarks/results/recontext.{md,csv,json} and recontext_grid.png.
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
from benchmarks.fits import t_interval
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
ONE_BACKGROUND, SHIPPED = "one background (gray only)", "shipped subject (gray + black)"


def write_one_background(folder: Path, count: int = 5) -> Path:
    """The subject's ``count`` training poses (``targets.write_subject``'s draws) all rendered on gray, each with a
    ``.txt`` caption naming it: the subject as it was before target version 5."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((0, 1))  # write_subject's generator: the same poses as the shipped renders
    for i in range(count):
        spec = targets.subject_spec(rng, background="gray")
        Image.fromarray(shapes.render(spec, 32)).save(folder / f"subject_{i:02d}.png")
        (folder / f"subject_{i:02d}.txt").write_text(targets.subject_prompt("gray"))
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
        trained = targets.SUBJECT_BACKGROUNDS if arm == SHIPPED else ("gray",)
        shown = "trained" if background in trained else "new"
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


def _mean_cell(values: list, percent: bool) -> str:
    """``mean ± half-width`` of the 95% t-interval over seeds (empty without values)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    mean, half, _ = t_interval(values)
    scale, unit, digits = (100, "%", 0) if percent else (1, "", 2)
    spread = "" if half != half else f" ± {scale * half:.{digits}f}{unit}"
    return f"{scale * mean:.{digits}f}{unit}{spread}"


def summarise(rows: list[dict]) -> list[dict]:
    """Per arm and background: the mean over seeds ± the 95% t-interval's half-width of each score."""
    out = []
    for key in dict.fromkeys((r["arm"], r["background"]) for r in rows):
        group = [r for r in rows if (r["arm"], r["background"]) == key]
        out.append({"arm": key[0], "background": key[1], "seeds": len(group),
                    "progress": _mean_cell([r["progress"] for r in group], False),
                    "striped": _mean_cell([r["striped"] for r in group], True),
                    "prompted background": _mean_cell([r["background_acc"] for r in group], True),
                    "class plain": _mean_cell([r["plain"] for r in group], True)})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--count", type=int, default=48, help="samples per prompt")
    parser.add_argument("--root", default="runs/recontext")
    parser.add_argument("--out", default=str(RESULTS / "recontext"))
    args = parser.parse_args(argv)
    print(f"benchmarks.recontext: expected about {len(args.seeds) * 7} min on 2 free cores "
          f"({len(args.seeds)} seed(s) x 2 fits of 300 steps, then scoring)", flush=True)  # fmt: skip
    start = time.perf_counter()
    root = Path(args.root)
    one = write_one_background(root / "one_background")
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
    rows, grids, runs = [], [], {}
    for seed in args.seeds:
        for arm, folder_name, extra in ((ONE_BACKGROUND, "one", ["--data.instance_dir", str(one)]),
                                        (SHIPPED, "shipped", [])):  # fmt: skip
            log_dir = fit_run(EXPERIMENT, seed, 300, root / f"{folder_name}_seed{seed}", extra)
            runs[f"{folder_name}_seed{seed}"] = str(log_dir)
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
    summary = "\n".join(markdown_table(summarise(rows), ["arm", "background", "seeds", "progress", "striped",
                                                          "prompted background", "class plain"]))  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    text = [
        "# The subject in new contexts: one training background against two",
        "",
        f"Levels ({args.count} samples each): class prior {levels['prior']:.3f} (the pretrained model's class-prompt "
        f"samples), ceiling {levels['ceiling']:.3f} (autoencoder round trips of held-out subject renders); progress "
        "= (identity - prior) / (ceiling - prior). Identity against the shipped subject's 5 instance images (3 on "
        "gray, 2 on black; the identity embedding leaves the background out). Mean over seeds ± half-width of the 95% "
        "t-interval:",
        "",
        summary,
        "",
        "Every seed:",
        "",
        table,
        "",
        f"Command: `python -m benchmarks.recontext --seeds {' '.join(map(str, args.seeds))} --count {args.count}`; "
        f"{minutes:.1f} min. Samples: 25 DDIM steps, guidance 2, seeds 0-{args.count - 1}. Grid "
        "(`recontext_grid.png`, first seed): per arm (gray only, then shipped), the instance token on black, gray and "
        "navy, then the class prompt, 8 samples each. Runs: " + ", ".join(f"{k}: {v}" for k, v in runs.items()) + ".",
        "",
    ]
    Path(f"{out}.md").write_text("\n".join(text))
    print("\n".join(text))
    (Path(f"{out}.json")).write_text(json.dumps({"levels": levels, "rows": rows, "runs": runs}, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
