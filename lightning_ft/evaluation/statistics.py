"""Means with 95% intervals, and the references' own leave-one-out similarity (the "real images" row).

The interval is Student's t over the per-sample scores: mean +- t(0.975, n - 1) * s / sqrt(n), with s the sample
standard deviation. It treats the samples as independent draws; the samples of one prompt share that prompt, so the
interval of a pooled row is narrower than the spread between prompts would justify (compare the per-prompt rows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

LEVEL = 0.95
INTERVAL = "95% t-interval over samples (mean ± t(0.975, n-1)·s/√n, clipped to the score's range)"


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 <= p < 1) of Student's t with ``df`` >= 1 degrees of freedom: the density is
    integrated from 0 (Simpson's rule) and the upper bound bisected; |error| < 1e-6 for p <= 0.999."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    if not 0.5 <= p < 1:
        raise ValueError(f"t_quantile: p must be in [0.5, 1), got {p}")
    if df == 1:  # Cauchy: its tail is too heavy for a finite integration range
        return math.tan(math.pi * (p - 0.5))
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf_above_half(x: float) -> float:  # P(0 < T < x)
        grid = np.linspace(0.0, x, 4001)
        pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
        return float((grid[1] - grid[0]) / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum()))

    low, high = 0.0, 1.0
    while cdf_above_half(high) < p - 0.5:
        low, high = high, 2 * high
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf_above_half(mid) < p - 0.5 else (low, mid)
    return (low + high) / 2


@dataclass
class Estimate:
    """A mean over ``n`` scores with its 95% interval (``low``, ``high``); NaN bounds for fewer than 2 scores, NaN
    everything for none."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        """For JSON: NaN as None."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def estimate(values, bounds: tuple[float, float] | None = None) -> Estimate:
    """Mean and 95% t-interval of ``values`` (a sequence or tensor of per-sample scores; NaN entries, scores that
    do not apply to a sample, are left out and not counted); ``bounds``: the range of the score (e.g. (-1, 1) for a
    cosine, (0, 1) for an accuracy), which the interval is clipped to."""
    x = np.asarray(torch.as_tensor(values, dtype=torch.float64).cpu(), dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(x.mean())
    if n < 2:
        return Estimate(mean, float("nan"), float("nan"), 1)
    half = t_quantile(0.5 + LEVEL / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Estimate(mean, low, high, n)


def mean_similarity(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean cosine similarity of its features to every reference's, (N,): DreamBooth's DINO and
    CLIP-I (their mean is ``lightning_ft.metrics.subject_fidelity``). Inputs: (N, D) and (R, D) features."""
    g, r = F.normalize(samples.float(), dim=-1), F.normalize(references.float(), dim=-1)
    return (g @ r.T).mean(dim=1)


def leave_one_out(references: torch.Tensor, what: str = "references") -> torch.Tensor:
    """Per reference, the mean cosine similarity of its features to every other reference's, (R,): the "real
    images" row, the score a sample indistinguishable from the references would get. Needs R >= 2."""
    n = len(references)
    if n < 2:
        raise ValueError(f"{what}: the real-images row compares each reference with the others; it needs at least "
                         f"2 images, got {n}")  # fmt: skip
    r = F.normalize(references.float(), dim=-1)
    sim = r @ r.T
    return (sim.sum(dim=1) - sim.diagonal()) / (n - 1)
