"""Scores of generated images: FID/KID (torchmetrics), subject fidelity, memorisation, diversity, prompt accuracy
and high-frequency energy.

Images are float tensors (N, 3, H, W) in [0, 1] (uint8 also accepted). Wherever a score takes images for a
backbone, a 2-D tensor (N, D) is taken as features already computed with that backbone, so a callback can extract
the reference set's features once and reuse them at every evaluation.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_ft.data.shapes import RESERVED_TOKENS
from lightning_ft.metrics.backbones import FeatureExtractor, as_backbone
from lightning_ft.metrics.feature_net import ShapesFeatureNet, default_feature_net


def features(images: Tensor, backbone: nn.Module | str | None = None, batch_size: int = 256) -> Tensor:
    """(N, D) features of ``images`` with ``backbone`` (default: the shapes net); a 2-D input is returned as is."""
    if images.ndim == 2:
        return images
    return as_backbone(backbone).extract(images, batch_size)


class _Precomputed(nn.Module):
    """The identity as torchmetrics' custom ``feature`` module: features are extracted once by the backbone and
    fed to both FID and KID, instead of each metric running the backbone over the same images again."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


class FIDScorer:
    """FID and KID of generated images against a reference set whose features are computed once.

    Args:
        backbone: feature extractor, a name for ``make_backbone`` or None (default: the shapes net).
        kid_subset_size: images per KID subset (default 1000), lowered to the smaller set's size when needed.
        kid_subsets: number of KID subsets (default 100).
        seed: seed of KID's subset sampling (default 0), so that repeated scores are comparable.
        batch_size: images per backbone forward (default 256).

    Usage: ``scorer = FIDScorer().set_reference(real_images)``, then ``scorer.score(samples)`` as often as needed.
    """

    def __init__(
        self,
        backbone: nn.Module | str | None = None,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        seed: int = 0,
        batch_size: int = 256,
    ):
        self.backbone: FeatureExtractor = as_backbone(backbone)
        self.kid_subset_size, self.kid_subsets = kid_subset_size, kid_subsets
        self.seed, self.batch_size = seed, batch_size
        self.reference: Tensor | None = None

    def set_reference(self, images: Tensor) -> FIDScorer:
        """Extract and keep the reference ("real") features; ``images`` may be (N, D) features. Returns self."""
        self.reference = self._features(images)
        return self

    def _features(self, images: Tensor) -> Tensor:
        feats = features(images, self.backbone, self.batch_size)
        if feats.ndim != 2 or feats.shape[1] != self.backbone.num_features:
            raise ValueError(f"expected features (N, {self.backbone.num_features}), got {tuple(feats.shape)}")
        if len(feats) < 2:
            raise ValueError(f"FID/KID need at least 2 images per set, got {len(feats)}")
        # FID's covariances accumulate in float64 in torchmetrics; giving it float64 keeps the result in float64.
        return feats.detach().double().cpu()

    def score(self, fake: Tensor) -> dict[str, float]:
        """FID and KID of ``fake`` (images or features) against the reference.

        Returns ``{"fid", "kid_mean", "kid_std", "n_real", "n_fake"}``; the counts belong with the scores, since both
        FID and KID are biased by the sample size."""
        if self.reference is None:
            raise RuntimeError("call set_reference(images) before score()")
        real, fake_f = self.reference, self._features(fake)
        module = _Precomputed(real.shape[1])
        fid = FrechetInceptionDistance(feature=module, normalize=True)
        fid.update(real, real=True)
        fid.update(fake_f, real=False)
        subset = min(self.kid_subset_size, len(real), len(fake_f))
        # When a subset is each whole set, every subset gives the same value: one is enough.
        subsets = 1 if subset == len(real) == len(fake_f) else self.kid_subsets
        with warnings.catch_warnings():
            # KID warns that it keeps every feature in memory: intended here, the inputs are already features.
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            kid = KernelInceptionDistance(feature=module, subsets=subsets, subset_size=subset, normalize=True)
        kid.update(real, real=True)
        kid.update(fake_f, real=False)
        # KID draws its subsets from the global torch RNG: fork it so that scoring during training neither changes
        # the training run's random stream nor gives a different KID for the same samples.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            kid_mean, kid_std = kid.compute()
        return {
            "fid": float(fid.compute()),
            "kid_mean": float(kid_mean),
            "kid_std": float(kid_std),
            "n_real": len(real),
            "n_fake": len(fake_f),
        }


def fid_kid(
    real: Tensor,
    fake: Tensor,
    backbone: nn.Module | str | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
) -> dict[str, float]:
    """FID and KID between two image sets (see ``FIDScorer``; use it directly to reuse the real features).

    Args:
        real, fake: images (N, 3, H, W) in [0, 1] or (N, D) features, at least 2 each.
        backbone: feature extractor (default: the shapes net).
        kid_subset_size: images per KID subset (default 1000, capped at the smaller set's size).
        kid_subsets: number of KID subsets (default 100).

    KID is an unbiased estimate: near 0 for two samples of one distribution, and negative for a set scored
    against itself (shared images make the cross term too large), so only FID is ~0 there.
    """
    scorer = FIDScorer(backbone, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets)
    return scorer.set_reference(real).score(fake)


def _unit(*sets: Tensor, backbone: nn.Module | str | None) -> list[Tensor]:
    """L2-normalised features of each set, loading the backbone once when any set is images."""
    if any(x.ndim != 2 for x in sets):
        backbone = as_backbone(backbone)
    return [F.normalize(features(x, backbone).float(), dim=-1) for x in sets]


def subject_fidelity(generated: Tensor, references: Tensor, backbone: nn.Module | str | None = None) -> float:
    """Mean cosine similarity of features over every (generated, reference) pair: the DINO / CLIP-I score of
    DreamBooth papers. 1 means every sample looks like every reference to the backbone."""
    g, r = _unit(generated, references, backbone=backbone)
    return float((g @ r.T).mean())


def memorisation(generated: Tensor, references: Tensor, backbone: nn.Module | str | None = None) -> float:
    """Mean over generated images of the highest cosine similarity to any reference: near 1 when samples copy
    training images."""
    g, r = _unit(generated, references, backbone=backbone)
    return float((g @ r.T).amax(dim=1).mean())


def diversity(generated: Tensor, backbone: nn.Module | str | None = None) -> float:
    """Mean of (1 - cosine similarity) over distinct pairs of generated images; 0 for fewer than 2 images."""
    if len(generated) < 2:
        return 0.0
    (f,) = _unit(generated, backbone=backbone)
    n = len(f)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=f.device)
    return float((1.0 - f @ f.T)[off_diagonal].mean())


_ALIASES = {"grey": "gray", "violet": "purple"}


def parse_prompt(prompt: str, label_names: dict[str, list[str]]) -> dict[str, int]:
    """Class index per attribute named in ``prompt``; attributes it does not name (e.g. the shape of a subject
    called ``sks``) are absent. When a prompt names two values of one attribute, the first is taken: captions put
    the main colour first (``"a red star with blue stripes"``)."""
    found: dict[str, int] = {}
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in RESERVED_TOKENS:
            continue
        word = _ALIASES.get(word, word)
        # Plurals ("stars", "crosses") name the same class.
        candidates = [word] + ([word[:-1]] if word.endswith("s") else []) + ([word[:-2]] if word.endswith("es") else [])
        for attribute, names in label_names.items():
            match = next((c for c in candidates if c in names), None)
            if attribute not in found and match is not None:
                found[attribute] = names.index(match)
    return found


@torch.no_grad()
def prompt_accuracy(images: Tensor, prompts: list[str], net: nn.Module | None = None) -> dict[str, float]:
    """Attribute accuracy of images against their prompts, judged by the shapes net (the CLIP-T role).

    Args:
        images: (N, 3, H, W) in [0, 1].
        prompts: N prompts; each attribute a prompt names (shape, colour, background) is scored for its image.
        net: a ``ShapesFeatureNet`` (or a ``FeatureExtractor`` around one); default: the shipped net.

    Returns ``{attribute: accuracy}`` (NaN when no prompt names it) and ``{"n_" + attribute: count}``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    net = net.module if isinstance(net, FeatureExtractor) else net
    net = net if net is not None else default_feature_net()
    if not isinstance(net, ShapesFeatureNet):
        raise TypeError("prompt_accuracy needs a ShapesFeatureNet (a classifier of the shapes world's attributes)")
    preds = {k: [] for k in net.label_names}
    for i in range(0, len(images), 256):
        for k, p in net.predict(images[i : i + 256]).items():
            preds[k].append(p.cpu())
    preds = {k: torch.cat(v) for k, v in preds.items()}
    targets = [parse_prompt(p, net.label_names) for p in prompts]
    result: dict[str, float] = {}
    for attribute in net.label_names:
        scored = [(i, t[attribute]) for i, t in enumerate(targets) if attribute in t]
        correct = sum(int(preds[attribute][i]) == label for i, label in scored)
        result[attribute] = correct / len(scored) if scored else float("nan")
        result[f"n_{attribute}"] = len(scored)
    return result


def high_frequency_energy(images: Tensor) -> Tensor:
    """Fraction of each image's spectral energy above half the Nyquist frequency, (N,) in [0, 1].

    The spectrum is that of the grayscale image minus its mean; "above" means a radial frequency over 0.25 cycles
    per pixel. White noise puts about 80% of its energy there, a clean render mostly its edges: a sample still
    carrying diffusion noise scores high. A flat image scores 0.

    Args:
        images: (N, 3, H, W) or (N, 1, H, W) or (N, H, W); float (any range: the score is scale- and
            offset-invariant) or uint8.
    """
    x = images.float()
    if x.ndim == 4:
        if x.shape[1] == 3:
            x = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        else:
            x = x.mean(dim=1)
    if x.ndim != 3:
        raise ValueError(f"expected images (N, C, H, W) or (N, H, W), got {tuple(images.shape)}")
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().square()
    fy = torch.fft.fftfreq(x.shape[-2], device=x.device)[:, None]
    fx = torch.fft.fftfreq(x.shape[-1], device=x.device)[None, :]
    high = (fx.square() + fy.square()).sqrt() > 0.25
    total = power.sum(dim=(-2, -1))
    return torch.where(total > 0, (power * high).sum(dim=(-2, -1)) / total.clamp_min(1e-30), torch.zeros_like(total))
