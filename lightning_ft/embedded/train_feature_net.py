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
from lightning_ft.embedded.feature_net import ShapesFeatureNet

STRIPE_PROB, OUTLINE_PROB = 0.5, 0.2


def random_spec(rng: np.random.Generator) -> shapes.ShapeSpec:
    """A random training spec, striped with probability 0.5 and (independently) outlined with probability 0.2."""
    return shapes.styled(shapes.sample_spec(rng), rng, rng.random() < STRIPE_PROB, rng.random() < OUTLINE_PROB)


def render_batch(specs: list[shapes.ShapeSpec], resolution: int = 32) -> tuple[Tensor, dict[str, Tensor]]:
    """Float images (N, 3, H, W) in [0, 1] and long label tensors per attribute."""
    images = np.stack([shapes.render(s, resolution) for s in specs])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    rows = [shapes.labels(s) for s in specs]
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
    ):
        self.rng, self.refresh, self.resolution = rng, refresh, resolution
        self.autoencoder, self.roundtrip = autoencoder, roundtrip
        self.images, self.labels = self._new(size)

    def _new(self, count: int) -> tuple[Tensor, dict[str, Tensor]]:
        """``count`` fresh renders, a fraction ``roundtrip`` of them passed through the autoencoder: every sample
        the net will judge was decoded by such an autoencoder, so its blur must not change what the net sees."""
        x, y = render_batch([random_spec(self.rng) for _ in range(count)], self.resolution)
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


def heldout_set(seed: int, count: int, resolution: int = 32, styles: bool = False):
    """``count`` renders of the deterministic stream ``seed``: plain source-domain specs, or with ``styles`` the same
    specs made striped, outlined or both (in turn)."""
    specs = [shapes.spec_for_index(seed, i) for i in range(count)]
    if styles:
        rng = np.random.default_rng(seed)
        specs = [shapes.styled(s, rng, stripes=i % 3 != 1, outline=i % 3 != 0) for i, s in enumerate(specs)]
    return render_batch(specs, resolution)


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
) -> ShapesFeatureNet:
    """Train a ``ShapesFeatureNet`` with Adam, a one-cycle learning rate (5% warm-up, cosine decay) and the sum of
    the heads' cross-entropies; returns it in eval mode, its identity centre set from 4,000 renders of another stream.
    ``pool_size``, ``refresh``, ``autoencoder`` and ``roundtrip``: see ``RenderPool``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = ShapesFeatureNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    pool = RenderPool(rng, pool_size, refresh, resolution, autoencoder, roundtrip)
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
    net.set_center(render_batch([random_spec(center_rng) for _ in range(4000)], resolution)[0])
    return net


MODEL_CARD = """# shapes-features: the embedded world's metric backbone

`ShapesFeatureNet` ({params:,} parameters, {size_kb:.0f} kB): a small CNN over 32x32 RGB images in [0, 1] of the
procedural shapes world (`lightning_ft/embedded/shapes.py`). It returns a {dim}-d feature vector and has five linear
heads on it: shape (6), colour (8), background (3), surface pattern (plain, striped, outlined, striped-outlined) and
stripe colour (none + 8).

**Used for** the embedded models only (their `lightning_ft.json` declares it; real models get DINO, Inception and
CLIP): subject identity, memorisation and diversity (cosine similarity of the *identity* embedding: the features
minus their mean over 4,000 renders of the world, the DINO role), FID and KID (torchmetrics with the raw features as
the custom `feature` module), ANL's image conditions (the last feature map as tokens), and prompt fidelity as
attribute accuracy of samples (the CLIP-T role). See `lightning_ft.embedded.backbones`.

**Trained** from scratch for {steps} steps (batch {batch_size}, Adam with one-cycle schedule, seed {seed}) on fresh
random renders, {stripe:.0%} with two-tone stripes (period 0.08-0.3 of the width) and {outline:.0%} outlined (colour
label = main colour), {roundtrip:.0%} of them passed through the autoencoder `{autoencoder}` (whose blur every
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


def write_model_card(out: Path, metrics: dict) -> None:
    """``out/README.md`` from the content of the run's ``metrics.json``."""
    heldout, styled = metrics["heldout"], metrics["heldout_styled"]
    text = MODEL_CARD.format(
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
    )
    wall = time.time() - start
    plain = accuracy(net, *heldout_set(args.eval_seed, args.eval_count))
    styled_acc = accuracy(net, *heldout_set(args.eval_seed, args.eval_count, styles=True))
    out = net.save(args.out)
    command = "python -m lightning_ft.embedded.train_feature_net " + " ".join(argv)
    metrics = {
        "command": command,
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
