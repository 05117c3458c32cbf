"""Scores of generated images: FID/KID (torchmetrics), subject fidelity, memorisation, diversity and high-frequency
energy.

Images are float tensors (N, 3, H, W) in [0, 1] (uint8 also accepted). Wherever a score takes images for a
backbone, a 2-D tensor (N, D) is taken as features already computed with that backbone, so a callback can extract
the reference set's features once and reuse them at every evaluation.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_ft.metrics.backbones import FeatureExtractor, as_backbone


def features(images: Tensor, backbone: nn.Module | str | None = None, batch_size: int = 256) -> Tensor:
    """(N, D) features of ``images`` with ``backbone`` (a ``FeatureExtractor``, a module with ``num_features`` or a
    name for ``make_backbone``); a 2-D input is taken as features already computed and returned as is."""
    if images.ndim == 2:
        return images
    if backbone is None:
        raise ValueError("images need a backbone to be scored (e.g. resolve_backbone('identity', ...)); none given")
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
        backbone: feature extractor or a name for ``make_backbone`` (e.g. ``inception``).
        kid_subset_size: images per KID subset (default 1000), lowered to the smaller set's size when needed.
        kid_subsets: number of KID subsets (default 100).
        seed: seed of KID's subset sampling (default 0), so that repeated scores are comparable.
        batch_size: images per backbone forward (default 256).

    Usage: ``scorer = FIDScorer().set_reference(real_images)``, then ``scorer.score(samples)`` as often as needed.
    """

    def __init__(
        self,
        backbone: nn.Module | str,
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
    backbone: nn.Module | str,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
) -> dict[str, float]:
    """FID and KID between two image sets (see ``FIDScorer``; use it directly to reuse the real features).

    Args:
        real, fake: images (N, 3, H, W) in [0, 1] or (N, D) features, at least 2 each.
        backbone: feature extractor or a name for ``make_backbone``.
        kid_subset_size: images per KID subset (default 1000, capped at the smaller set's size).
        kid_subsets: number of KID subsets (default 100).

    KID is an unbiased estimate: near 0 for two samples of one distribution, and negative for a set scored
    against itself (shared images make the cross term too large), so only FID is ~0 there.
    """
    scorer = FIDScorer(backbone, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets)
    return scorer.set_reference(real).score(fake)


def _unit(*sets: Tensor, backbone: nn.Module | str | None) -> list[Tensor]:
    """L2-normalised features of each set, loading the backbone once when any set is images."""
    if any(x.ndim != 2 for x in sets) and backbone is not None:
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
