"""Train the shapes world's metric backbone (``ShapesFeatureNet``) and write it as a shipped asset.

To run (about 20 minutes on one CPU thread):

    python -m lightning_ft.embedded.train_feature_net --out lightning_ft/embedded/assets/shapes-features \
        --steps 8000 --seed 0 --autoencoder lightning_ft/embedded/assets/shapes-t2i/vae

Training images are fresh random renders; half get two-tone stripes and 20% an outline, with heads for the surface
pattern and the stripe colour, so that the features tell a specific patterned object from its plain class (the
colour label stays the main colour); 30% are passed through the autoencoder, whose blur every sample carries, and
half get a smooth colour mottling like that of generated samples.
Held-out accuracy is measured on plain source-domain renders of another seed and written with the run's settings
to ``metrics.json``, next to a ``README.md`` model card.

``--version 4`` (the default) is the recipe of the shipped ``shapes-features``. ``--version 5`` (``shapes-features-v5``,
not the default of any model) draws stripe periods log-uniformly over 0.08-0.42 of the width, adds a head for the
period in log-spaced bins and reads identity per head (``IDENTITY_HEADS_V5``), so that the subject is told from the same
object with narrower or wider stripes or with its two colours swapped (``python -m benchmarks.identity_decoys``):

    python -m lightning_ft.embedded.train_feature_net --out lightning_ft/embedded/assets/shapes-features-v5 \
        --version 5 --steps 4000 --seed 0 --autoencoder lightning_ft/embedded/assets/shapes-t2i/vae
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor

from lightning_ft.embedded import shapes
from lightning_ft.embedded.feature_net import ShapesFeatureNet, default_label_names

STRIPE_PROB, OUTLINE_PROB = 0.5, 0.2
VERSIONS = (4, 5)
# Version 5: stripe periods drawn log-uniformly over a wider range, and a head for the period in log-spaced bins, so
# that the features tell a subject from the same object with narrower or wider stripes.
PERIOD_RANGE = (0.08, 0.42)
PERIOD_BINS = 8
# Version 5's identity embedding (``ShapesFeatureNet.identity_heads``): the centred features at half weight, and the
# class probabilities of every head that names what an object is (not the background: identity must ignore it).
IDENTITY_HEADS_V5 = {
    "features": 0.5,
    "shape": 1.0,
    "color": 1.0,
    "pattern": 1.0,
    "stripe_color": 1.0,
    "stripe_period": 1.0,
}


def period_edges() -> np.ndarray:
    """The ``PERIOD_BINS + 1`` log-spaced edges of the stripe-period bins over ``PERIOD_RANGE``."""
    return np.geomspace(*PERIOD_RANGE, PERIOD_BINS + 1)


def period_names() -> list[str]:
    """Class names of the stripe-period head: ``none`` and one name per bin (``period-0.080-0.099``)."""
    edges = period_edges()
    return ["none"] + [f"period-{a:.3f}-{b:.3f}" for a, b in zip(edges[:-1], edges[1:])]


def period_label(spec: shapes.ShapeSpec) -> int:
    """0 for an unstriped spec, else 1 + the bin of its stripe period (periods outside the range: the end bins)."""
    if spec.stripes is None:
        return 0
    return 1 + int(np.clip(np.searchsorted(period_edges(), spec.stripes[1], side="right") - 1, 0, PERIOD_BINS - 1))


def label_names(version: int) -> dict[str, list[str]]:
    """Class names of the heads of a version's net."""
    names = {k: list(v) for k, v in default_label_names().items()}
    if version >= 5:
        names["stripe_period"] = period_names()
    return names


def spec_labels(spec: shapes.ShapeSpec, version: int = 4) -> dict[str, int]:
    """Integer labels of ``spec`` for a version's heads: ``shapes.labels`` (the colour label is the base colour,
    ``stripe_color`` the stripes'), plus for version 5 ``stripe_period``, and colour labels by area (``base_share``)."""
    row = shapes.labels(spec)
    if version >= 5:
        row["stripe_period"] = period_label(spec)
        if spec.stripes is not None and base_share(spec) < 0.5:
            # The stripes cover more of the shape than the base colour does: which colour is drawn first is then
            # not what an image shows, which colour dominates is.
            row["color"] = list(shapes.COLORS).index(spec.stripes[0])
            row["stripe_color"] = shapes.STRIPE_COLORS.index(spec.color)
    return row


def base_share(spec: shapes.ShapeSpec, resolution: int = 32) -> float:
    """Fraction of a striped shape's area in its base colour (``spec.color``). Version 5's colour labels name the
    colour covering most of the shape and ``stripe_color`` the other: the subject's orange covers about 60% of it,
    so the net tells it from a blue star with orange stripes, where blue covers 60%."""
    mask = shapes.shape_mask(spec, resolution)
    stripes = shapes._stripe_field(spec, resolution)
    return float(((1 - stripes) * mask).sum() / max(float(mask.sum()), 1e-8))


def random_spec(rng: np.random.Generator, version: int = 4) -> shapes.ShapeSpec:
    """A random training spec, striped with probability 0.5 and (independently) outlined with probability 0.2;
    version 5 redraws the stripe period log-uniformly over ``PERIOD_RANGE``."""
    spec = shapes.styled(shapes.sample_spec(rng), rng, rng.random() < STRIPE_PROB, rng.random() < OUTLINE_PROB)
    if version >= 5 and spec.stripes is not None:
        period = float(np.exp(rng.uniform(*np.log(PERIOD_RANGE))))
        spec = shapes.ShapeSpec(**{**spec.__dict__, "stripes": (spec.stripes[0], period)})
    return spec


def render_batch(
    specs: list[shapes.ShapeSpec], resolution: int = 32, version: int = 4
) -> tuple[Tensor, dict[str, Tensor]]:
    """Float images (N, 3, H, W) in [0, 1] and long label tensors per attribute."""
    images = np.stack([shapes.render(s, resolution) for s in specs])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    rows = [spec_labels(s, version) for s in specs]
    y = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    return x, y


class RenderPool:
    """A pool of rendered training images of which ``refresh`` are replaced by new renders each step.

    Rendering costs about 1 ms per image, as much as a training step on 128 images, so each batch is drawn from a
    pool that keeps turning over instead of being rendered whole."""

    def __init__(
        self,
        rng: np.random.Generator,
        size: int,
        refresh: int,
        resolution: int = 32,
        autoencoder: AutoencoderKL | None = None,
        roundtrip: float = 0.0,
        version: int = 4,
    ):
        self.rng, self.refresh, self.resolution, self.version = rng, refresh, resolution, version
        self.autoencoder, self.roundtrip = autoencoder, roundtrip
        self.images, self.labels = self._new(size)

    def _new(self, count: int) -> tuple[Tensor, dict[str, Tensor]]:
        """``count`` fresh renders, a fraction ``roundtrip`` of them passed through the autoencoder: every sample
        the net will judge was decoded by such an autoencoder, so its blur must not change what the net sees."""
        x, y = render_batch([random_spec(self.rng, self.version) for _ in range(count)], self.resolution, self.version)
        if self.autoencoder is not None and self.roundtrip > 0:
            chosen = torch.from_numpy(self.rng.random(count) < self.roundtrip)
            for i in range(0, count, 500):
                part = chosen[i : i + 500]
                if part.any():
                    x[i : i + 500][part] = autoencoder_round_trip(self.autoencoder, x[i : i + 500][part])
        return x, y

    def batch(self, batch_size: int) -> tuple[Tensor, dict[str, Tensor]]:
        slots = torch.from_numpy(self.rng.choice(len(self.images), self.refresh, replace=False))
        new_x, new_y = self._new(self.refresh)
        self.images[slots] = new_x
        for k in self.labels:
            self.labels[k][slots] = new_y[k]
        index = torch.from_numpy(self.rng.choice(len(self.images), batch_size, replace=False))
        return augment(self.images[index], self.rng), {k: v[index] for k, v in self.labels.items()}


@torch.no_grad()
def autoencoder_round_trip(autoencoder: AutoencoderKL, x: Tensor) -> Tensor:
    """Images in [0, 1] encoded (posterior mode) and decoded by ``autoencoder``, clamped back to [0, 1]."""
    latents = autoencoder.encode(x * 2 - 1).latent_dist.mode()
    return ((autoencoder.decode(latents).sample + 1) / 2).clamp(0, 1)


def augment(x: Tensor, rng: np.random.Generator, texture: float = 0.5) -> Tensor:
    """Random flips and quarter turns (exact pixel operations that leave every attribute label unchanged), and on a
    fraction ``texture`` of the images a smooth colour mottling: generated samples are never as flat as renders,
    and without it the pattern head reads their mottling as stripes."""
    flip = torch.from_numpy(rng.random(len(x)) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    x = torch.rot90(x, int(rng.integers(4)), dims=(-2, -1))
    return mottle(x, rng, texture)


def mottle(x: Tensor, rng: np.random.Generator, fraction: float, strength: float = 0.12) -> Tensor:
    """Multiply a ``fraction`` of the images by 1 + a smooth random field per channel (4x4 noise upsampled, up to
    ``strength`` in amplitude) and a per-channel gain within +-5%: the low-frequency colour wobble of samples."""
    chosen = torch.from_numpy(rng.random(len(x)) < fraction)
    if not chosen.any():
        return x
    n = int(chosen.sum())
    field = torch.from_numpy(rng.standard_normal((n, 3, 4, 4))).float()
    field = F.interpolate(field, size=x.shape[-2:], mode="bicubic", align_corners=False)
    amplitude = torch.from_numpy(rng.uniform(0, strength, (n, 1, 1, 1))).float()
    gain = torch.from_numpy(rng.uniform(-0.05, 0.05, (n, 3, 1, 1))).float()
    out = x.clone()
    out[chosen] = (x[chosen] * (1 + amplitude * field.clamp(-2, 2) / 2 + gain)).clamp(0, 1)
    return out


@torch.no_grad()
def accuracy(net: ShapesFeatureNet, images: Tensor, labels: dict[str, Tensor], batch_size: int = 500) -> dict:
    """Fraction of correct predictions per attribute."""
    net.eval()
    preds = {k: [] for k in labels}
    for i in range(0, len(images), batch_size):
        for k, p in net.predict(images[i : i + batch_size]).items():
            preds[k].append(p)
    return {k: float((torch.cat(preds[k]) == labels[k]).float().mean()) for k in labels}


def heldout_set(seed: int, count: int, resolution: int = 32, styles: bool = False, version: int = 4):
    """``count`` renders of the deterministic stream ``seed``: plain source-domain specs, or with ``styles`` the same
    specs made striped, outlined or both (in turn)."""
    specs = [shapes.spec_for_index(seed, i) for i in range(count)]
    if styles:
        rng = np.random.default_rng(seed)
        specs = [shapes.styled(s, rng, stripes=i % 3 != 1, outline=i % 3 != 0) for i, s in enumerate(specs)]
    return render_batch(specs, resolution, version)


def train(
    steps: int = 2000,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
    pool_size: int = 10_000,
    refresh: int = 16,
    resolution: int = 32,
    log_every: int = 250,
    autoencoder: AutoencoderKL | None = None,
    roundtrip: float = 0.3,
    version: int = 4,
) -> ShapesFeatureNet:
    """Train a ``ShapesFeatureNet`` with Adam, a one-cycle learning rate (5% warm-up, cosine decay) and the sum of
    the heads' cross-entropies; returns it in eval mode, its identity centre set from 4,000 renders of another stream.
    ``pool_size``, ``refresh``, ``autoencoder`` and ``roundtrip``: see ``RenderPool``. ``version`` 4 reproduces the
    shipped ``shapes-features``; 5 adds the stripe-period head and the per-head identity embedding."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if version == 4:
        net = ShapesFeatureNet()
    else:
        net = ShapesFeatureNet(label_names=label_names(version), identity_heads=IDENTITY_HEADS_V5)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    pool = RenderPool(rng, pool_size, refresh, resolution, autoencoder, roundtrip, version)
    net.train()
    start = time.time()
    for step in range(1, steps + 1):
        x, y = pool.batch(batch_size)
        logits = net.classify(x)
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    net.eval()
    center_rng = np.random.default_rng((seed, 7))
    net.set_center(render_batch([random_spec(center_rng, version) for _ in range(4000)], resolution, version)[0])
    return net


MODEL_CARD = """# shapes-features: the embedded world's metric backbone

`ShapesFeatureNet` ({params:,} parameters, {size_kb:.0f} kB): a small CNN over 32x32 RGB images in [0, 1] of the
procedural shapes world (`lightning_ft/embedded/shapes.py`). It returns a {dim}-d feature vector and has {heads}.

**Used for** the embedded models only {used_for} See `lightning_ft.embedded.backbones`.

**Trained** from scratch for {steps} steps (batch {batch_size}, Adam with one-cycle schedule, seed {seed}) on fresh
random renders, {stripe:.0%} with two-tone stripes (period {periods} of the width) and {outline:.0%} outlined (colour
label = {colour_label}), {roundtrip:.0%} of them passed through the autoencoder `{autoencoder}` (whose blur every
sample carries), with random flips and quarter turns, and half of them with a smooth colour mottling (samples are
never as flat as renders; without it the pattern head read a sample's mottling as stripes). Wall time {wall:.0f} s
on {threads} CPU thread(s).

    {command}

**Held-out accuracy** on {count} plain source-domain renders (seed {eval_seed}, never trained on):

| attribute | accuracy |
|---|---|
{rows}

On {count} striped/outlined renders of the same seed: {styled}.
These are lower by construction: stripes cover half of the shape, so which colour is the main one is ambiguous
for round shapes, and an outlined circle and an outlined ring draw the same pixels.

**Subject identity** and the levels a fidelity curve is read against are measured by
`python -m benchmarks.embedded_world` (`benchmarks/results/embedded_world.md`).

**Limits**: it knows only this world; the features of noisy or off-distribution samples are not calibrated, and it
is no judge of images from other domains. Files: `config.json` (architecture and class names), `model.safetensors`
(weights and the identity centre), `metrics.json` (the numbers above).
"""


CARD_V4 = {
    "heads": "five linear\nheads on it: shape (6), colour (8), background (3), surface pattern (plain, striped, "
    "outlined, striped-outlined) and\nstripe colour (none + 8)",
    "identity": "cosine similarity of the *identity* embedding: the features\nminus their mean over 4,000 renders of "
    "the world, the DINO role",
    "periods": "0.08-0.3",
    "colour_label": "main colour",
    "title": "shapes-features",
    "used_for": "(their `lightning_ft.json` declares it; real models get DINO, Inception and\nCLIP): FID and KID "
    "(torchmetrics with the raw features as the custom `feature` module), ANL's image conditions (the\nlast feature "
    "map as tokens), and prompt fidelity as attribute accuracy of samples (the CLIP-T role). Subject identity,\n"
    "memorisation and diversity of the subject (the DINO role) moved to `shapes-features-v5`, whose identity embedding "
    "tells\nthe subject from its near variants; this network's identity ({identity}) could not\n"
    "(`benchmarks/results/identity_decoys.md`).",
}
CARD_V5 = {
    "heads": "six linear\nheads on it: shape (6), colour (8, the one covering most of the shape), background (3), "
    "surface pattern (plain,\nstriped, outlined, striped-outlined), stripe colour (none + 8) and stripe period "
    f"(none + {PERIOD_BINS} log-spaced bins over {PERIOD_RANGE[0]:g}-{PERIOD_RANGE[1]:g} of the\nwidth)",
    "identity": "cosine similarity of the *identity* embedding, the DINO role;\nversion 5: blocks joined after "
    "normalising each, the features minus their mean over 4,000 renders "
    "(weight 0.5) and the class probabilities\nof the shape, colour, pattern, stripe-colour and stripe-period heads "
    "minus their means (weight 1 each; not the\nbackground), so that a cosine is the weighted mean of the blocks' "
    "cosines and a variant that differs in one\nattribute loses that head's share; its levels against near variants: "
    "`benchmarks/results/identity_decoys.md`",
    "periods": "{:g}-{:g}, log-uniform,".format(*PERIOD_RANGE),
    "colour_label": "the colour covering most of the shape, stripe colour the other",
    "title": "shapes-features-v5",
    "used_for": "(their `lightning_ft.json` declares `lightning_ft.embedded.backbones:identity`,\nwhich loads it; "
    "real models get DINO): subject identity, memorisation and diversity ({identity}). FID/KID, ANL's image "
    "conditions and\nprompt accuracy stay on version 4 (`shapes-features`), so that their numbers stay comparable.",
}


def write_model_card(out: Path, metrics: dict) -> None:
    """``out/README.md`` from the content of the run's ``metrics.json``."""
    heldout, styled = metrics["heldout"], metrics["heldout_styled"]
    card = CARD_V5 if metrics.get("version", 4) >= 5 else CARD_V4
    text = MODEL_CARD.replace("# shapes-features:", f"# {card['title']}:").format(
        heads=card["heads"],
        used_for=card["used_for"].format(identity=card["identity"]),
        periods=card["periods"],
        colour_label=card["colour_label"],
        params=metrics["parameters"],
        size_kb=(out / "model.safetensors").stat().st_size / 1024,
        dim=json.loads((out / "config.json").read_text())["num_features"],
        steps=metrics["steps"],
        batch_size=metrics["batch_size"],
        seed=metrics["seed"],
        stripe=STRIPE_PROB,
        outline=OUTLINE_PROB,
        roundtrip=metrics.get("roundtrip", 0.0),
        autoencoder=metrics.get("autoencoder") or "none",
        wall=metrics["wall_time_s"],
        threads=metrics["threads"],
        command=metrics["command"],
        count=heldout["count"],
        eval_seed=heldout["seed"],
        rows="\n".join(f"| {k} | {v:.2%} |" for k, v in heldout["accuracy"].items()),
        styled=", ".join(f"{k} {v:.2%}" for k, v in styled["accuracy"].items()),
    )
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, metrics)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-seed", type=int, default=9_999, help="seed of the held-out renders")
    parser.add_argument("--eval-count", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 leaves room for other jobs)")
    parser.add_argument("--autoencoder", default=None, help="AutoencoderKL folder whose round trips the net also sees")
    parser.add_argument("--roundtrip", type=float, default=0.3, help="fraction of training images round-tripped")
    parser.add_argument(
        "--version",
        type=int,
        default=4,
        choices=VERSIONS,
        help="4: the shipped shapes-features; 5: adds a stripe-period head and the per-head identity embedding",
    )
    args = parser.parse_args(argv)
    if args.eval_seed == args.seed:
        parser.error("--eval-seed must differ from --seed")
    torch.set_num_threads(args.threads)

    start = time.time()
    autoencoder = AutoencoderKL.from_pretrained(args.autoencoder).eval() if args.autoencoder else None
    net = train(
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        autoencoder=autoencoder,
        roundtrip=args.roundtrip,
        version=args.version,
    )
    wall = time.time() - start
    plain = accuracy(net, *heldout_set(args.eval_seed, args.eval_count, version=args.version))
    styled_acc = accuracy(net, *heldout_set(args.eval_seed, args.eval_count, styles=True, version=args.version))
    out = net.save(args.out)
    command = "python -m lightning_ft.embedded.train_feature_net " + " ".join(argv)
    metrics = {
        "command": command,
        "version": args.version,
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": args.threads,
        "wall_time_s": round(wall, 1),
        "parameters": sum(p.numel() for p in net.parameters()),
        "heldout": {"seed": args.eval_seed, "count": args.eval_count, "accuracy": plain},
        "heldout_styled": {"seed": args.eval_seed, "count": args.eval_count, "accuracy": styled_acc},
        "autoencoder": args.autoencoder,
        "roundtrip": args.roundtrip if args.autoencoder else 0.0,
        "torch": torch.__version__,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(out, metrics)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
