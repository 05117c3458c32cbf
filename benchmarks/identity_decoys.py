"""How finely does the embedded identity score tell the subject from its near variants?

    python -m benchmarks.identity_decoys [--features PATH ...] [--count 48]

Renders decoy sets of the embedded subject (``targets.subject_spec``: an orange star with wide blue stripes on gray)
with a seed other than the instance images' and random poses: the subject itself, the subject on every other
background, and variants that each change one attribute: the shape (circle, square, cross), the pattern (plain),
the stripe colour (green), which colour is the base (a blue star with orange stripes) and the stripe width (x0.5,
x0.75, x1.5); index ``i`` of every set has the same pose, so two sets differ only in the attribute named. The
subject's autoencoder round trip is scored too (the ceiling a generated sample can reach). Each set is scored with
the identity role (mean cosine of identity embeddings to the 5 instance images, ``subject_fidelity``) of every
feature network given (default: the shipped one), and the issue's criterion is checked per network: every variant
at least ``GAP`` below the subject, the subject on other backgrounds within ``BACKGROUND_TOLERANCE`` of it.

Writes ``benchmarks/results/identity_decoys.{md,csv}``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from lightning_ft.embedded import asset_path, shapes, targets

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def shown_path(folder: str) -> str:
    """``folder`` relative to the repository when inside it, else only its name (no machine paths in results)."""
    path = Path(folder).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


GAP = 0.15  # every variant at least this far below the subject
BACKGROUND_TOLERANCE = 0.05  # the subject on another background at most this far from the subject
SUBJECT, BACKGROUND, VARIANT, CEILING = "subject", "background", "variant", "ceiling"


@dataclasses.dataclass(frozen=True)
class Decoy:
    """One decoy set: ``overrides`` applied to the subject's spec; ``attribute`` names what they change;
    ``role``: ``subject`` (the reference row), ``background`` (must score like the subject), ``variant`` (must
    score ``GAP`` below it) or ``ceiling`` (the round trip, reported only)."""

    name: str
    attribute: str
    role: str
    overrides: dict = dataclasses.field(default_factory=dict)
    near: bool = False  # a near variant of the issue (stripe width, swapped colours)


def decoys() -> list[Decoy]:
    """The decoy sets, in table order."""
    s = targets.SUBJECT
    colour, (stripe, period) = s["color"], s["stripes"]
    rows = [Decoy("subject", "-", SUBJECT)]
    rows += [Decoy(f"subject on {bg}", "background", BACKGROUND, {"background": bg})
             for bg in shapes.BACKGROUNDS if bg != s["background"]]  # fmt: skip
    rows.append(Decoy(f"plain {colour} {s['shape']}", "pattern", VARIANT, {"stripes": None}))
    rows += [
        Decoy(f"striped {colour} {shape}", "shape", VARIANT, {"shape": shape})
        for shape in ("circle", "square", "cross")
    ]
    rows.append(Decoy(f"green-striped {s['shape']}", "stripe colour", VARIANT, {"stripes": ("green", period)}))
    rows.append(Decoy(f"swapped colours ({stripe} {s['shape']}, {colour} stripes)", "base colour", VARIANT,
                      {"color": stripe, "stripes": (colour, period)}, near=True))  # fmt: skip
    rows += [Decoy(f"stripe width x{f:g}", "stripe width", VARIANT, {"stripes": (stripe, period * f)}, near=True)
             for f in (0.5, 0.75, 1.5)]  # fmt: skip
    rows.append(Decoy("subject, autoencoder round trip (ceiling)", "-", CEILING))
    return rows


def decoy_specs(decoy: Decoy, count: int, seed: int = 17) -> list[shapes.ShapeSpec]:
    """``count`` specs of a decoy set: the subject's random poses of stream ``seed`` (the same for every decoy)
    with the decoy's overrides."""
    rng = np.random.default_rng((seed, 11))
    return [dataclasses.replace(targets.subject_spec(rng), **decoy.overrides) for _ in range(count)]


def render(specs: list[shapes.ShapeSpec]) -> torch.Tensor:
    return torch.from_numpy(np.stack([shapes.render(s) for s in specs])).permute(0, 3, 1, 2).float() / 255


def check(scores: dict[str, float], rows: list[Decoy]) -> dict[str, bool | None]:
    """Per decoy whether it meets the criterion (None for the subject and the ceiling) given the identity
    ``scores`` of one network."""
    subject = scores["subject"]
    out: dict[str, bool | None] = {}
    for d in rows:
        gap = subject - scores[d.name]
        out[d.name] = {BACKGROUND: abs(gap) <= BACKGROUND_TOLERANCE, VARIANT: gap >= GAP}.get(d.role)
    return out


def criterion_text() -> str:
    return (f"Criterion (issue 29): every variant at least {GAP:.2f} below the subject (gap = subject - decoy >= "
            f"{GAP:.2f}), while the subject on every other background stays within {BACKGROUND_TOLERANCE:.2f} of "
            "the subject (|gap| <= "
            f"{BACKGROUND_TOLERANCE:.2f}).")  # fmt: skip


def table(rows: list[Decoy], results: dict[str, dict[str, float]], n: dict[str, int]) -> tuple[list[dict], list[str]]:
    """CSV rows (one per network and decoy) and the markdown lines (one column pair per network, the criterion and
    its verdict per network) from ``results[network][decoy name]`` identity scores."""
    from benchmarks.tables import markdown_table

    csv_rows, wide = [], []
    verdicts = {net: check(scores, rows) for net, scores in results.items()}
    for d in rows:
        line = {"decoy": d.name, "changed": d.attribute, "n": n[d.name]}
        for net, scores in results.items():
            gap = scores["subject"] - scores[d.name]
            ok = verdicts[net][d.name]
            mark = "" if ok is None else (" ok" if ok else " **fails**")
            line[f"{net} identity"] = f"{scores[d.name]:.3f}"
            line[f"{net} gap"] = "" if d.role == SUBJECT else f"{gap:+.3f}{mark}"
            csv_rows.append({"network": net, "decoy": d.name, "changed": d.attribute, "role": d.role,
                             "near": d.near, "n": n[d.name], "identity": round(scores[d.name], 4),
                             "gap": round(gap, 4), "meets": "" if ok is None else ok})  # fmt: skip
        wide.append(line)
    columns = ["decoy", "changed", "n"] + [f"{net} {c}" for net in results for c in ("identity", "gap")]
    lines = markdown_table(wide, columns) + ["", criterion_text(), ""]
    for net, verdict in verdicts.items():
        failing = [name for name, ok in verdict.items() if ok is False]
        lines.append(f"- **{net}**: " + ("meets it." if not failing else f"fails it on {', '.join(failing)}."))
    return csv_rows, lines


@torch.no_grad()
def main(argv: list[str] | None = None) -> list[dict]:
    from diffusers import AutoencoderKL

    from benchmarks.embedded_world import load_folder
    from benchmarks.tables import write_csv
    from lightning_ft.embedded.backbones import identity
    from lightning_ft.embedded.train_feature_net import autoencoder_round_trip
    from lightning_ft.metrics import features, subject_fidelity

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", nargs="+", default=None,
                        help="feature network folders to compare (default: the shipped shapes-features)")  # fmt: skip
    parser.add_argument("--count", type=int, default=48, help="renders per decoy set")
    parser.add_argument("--seed", type=int, default=17, help="pose stream of the decoys (the instances use 0)")
    parser.add_argument("--autoencoder", default=str(asset_path("shapes-t2i") / "vae"))
    parser.add_argument("--out", default=str(RESULTS / "identity_decoys"))
    args = parser.parse_args(argv)
    folders = args.features or [str(asset_path("shapes-features"))]

    instances = load_folder(targets.ensure_target("subject") / "train")
    rows = decoys()
    images = {d.name: render(decoy_specs(d, args.count, args.seed)) for d in rows if d.role != CEILING}
    vae = AutoencoderKL.from_pretrained(args.autoencoder).eval()
    images[rows[-1].name] = autoencoder_round_trip(vae, images["subject"])
    results = {}
    for folder in folders:
        ident = identity(folder)
        ref = features(instances, ident)
        results[Path(folder).name] = {name: subject_fidelity(features(x, ident), ref) for name, x in images.items()}
    csv_rows, lines = table(rows, results, {name: len(x) for name, x in images.items()})
    notes = [
        f"Identity = mean cosine of the identity embeddings of each decoy set to the {len(instances)} instance images "
        "of `${embedded:subject}` (the identity role, `subject_fidelity`). Decoys: renders of pose stream "
        f"{args.seed} (the instance images use another), {args.count} per set, index i of every set in the same pose, "
        "so each set differs from the subject's only in the attribute named. Columns: one pair per feature network "
        "(`--features`, named by folder); gap = subject - decoy.",
        "",
        *lines,
        "",
        "Written by `python -m benchmarks.identity_decoys --features "
        + " ".join(shown_path(f) for f in folders)
        + f" --count {args.count}`.",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(csv_rows, f"{out}.csv")
    text = ["# Identity decoys: the subject against its near variants", "", *notes]
    Path(f"{out}.md").write_text("\n".join(text).rstrip() + "\n")
    print("\n".join(text))
    return csv_rows


if __name__ == "__main__":
    main()
