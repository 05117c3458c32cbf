"""Rules that read a fine-tuning run's curves and name its stage: *adapting*, *corruption* or *memorising*.

Few-shot fine-tuning of a diffusion model often goes through a *corruption stage* (BNN paper, arXiv 2405.19931):
fidelity to the training images first rises, then collapses into noisy patterns, then recovers into memorisation.
The paper shows the stage on a DINO-similarity curve; it gives no operational rule, so the rules below are
inferred and every threshold is an argument of ``classify_stages``.

Inputs, one value per evaluated step: ``fidelity`` f (subject fidelity, e.g. mean cosine similarity of samples to
the instance images), ``corruption`` c (high-frequency energy of the samples divided by that of the instance
images, so 1 means "as much fine detail as the training images") and optionally ``memorisation`` m
(nearest-instance similarity). Points are sorted by step; a point whose fidelity is NaN is labelled ``unknown``
and ignored by every rule below (it neither breaks nor extends a run).

For each remaining point i:

- running max M_i = max(f_0..f_i); rise R_i = M_i - f_0 (f_0 = first finite fidelity); drop D_i = M_i - f_i.
- threshold T_i = max(``min_dip`` * S, ``dip`` * R_i) when ``dip_mode="relative"`` (default), or
  max(``min_dip``, ``dip``) * S when ``dip_mode="absolute"``. S = 1 (score units), or, when the two reference
  levels of the score are known (``levels``: the class prior, what the pretrained model draws for the class, and
  the ceiling, what a perfect copy scores through the model's autoencoder), S = ceiling - prior: thresholds are
  then fractions of the distance from "nothing learnt" to "perfect", the same on every backbone and model.
- *dipped*: D_i > T_i.
- *noisy*: c_i > ``noise_factor`` (default 1.5: samples carry 1.5x the instance images' high-frequency energy).
  A missing or NaN c_i does not veto.
- *flagged*: dipped and (noisy, or ``require_noise=False``).
- **corruption**: a flagged point inside a run of at least ``min_points`` (default 1) consecutive flagged points.
- **memorising**: not corruption, m_i >= ``memorisation_threshold`` (default 0.95) and D_i <= T_i (fidelity
  is near its top: reached the first time, or recovered after a dip). A NaN or missing m_i is never memorising.
- **adapting**: everything else (fidelity rising, flat, or below its top without the corruption signature).

Report: the verdict is the label of the last finite point (``unknown`` if there is none); the corruption stage
is the first corruption run (``corruption_start``/``corruption_end`` = its first/last step, ``corruption_ongoing``
when it reaches the last point; later runs are listed in ``intervals``); ``best_step_before_corruption`` is the
step of the highest fidelity before the stage starts (over all points when there is no stage; ties go to the
earliest step); ``dip_depth`` is the largest D_i observed (0 for a curve that never falls).

Why these defaults. The inferred rule of docs/methods.md (BNN) flags DINO falling more than 0.2 below its running
max; in the paper's figure DINO rises 0.36 -> 0.90 (a rise of 0.54) and the corruption stage drops it by 0.3-0.5.
Other backbones have other scales, so the threshold is relative to the run's own rise: ``dip=0.3`` of the rise
(0.16 on the paper's curve, close to its 0.2) catches drops of 55-100% of the rise with margin. ``min_dip=0.1``
keeps sampling noise from being called a dip when the rise is small or the curve is flat (the fidelity of 8
samples moves by a few hundredths between evaluations); with ``levels`` it is 10% of the prior-to-ceiling span.
``require_noise=True`` asks for the paper's visible signature,
noisy high-frequency patterns, so that a fidelity drop towards clean but different images is not called
corruption; set it False to reproduce the fidelity-only rule. Nothing here needs torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

STAGE_CODES = {"unknown": -1, "adapting": 0, "corruption": 1, "memorising": 2}


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


@dataclass
class StageReport:
    """What ``classify_stages`` found; see the module docstring for the rules."""

    steps: list[int]
    stages: list[str]  # one label per point, in step order
    drops: list[float]  # D_i (NaN for unknown points)
    thresholds: list[float]  # T_i (NaN for unknown points)
    verdict: str
    corruption_detected: bool = False
    corruption_start: int | None = None
    corruption_end: int | None = None
    corruption_ongoing: bool = False
    intervals: list[tuple[int, int]] = field(default_factory=list)
    best_step_before_corruption: int | None = None
    best_fidelity: float | None = None
    dip_depth: float = 0.0

    @property
    def codes(self) -> list[int]:
        """Integer stage codes (``STAGE_CODES``: unknown -1, adapting 0, corruption 1, memorising 2)."""
        return [STAGE_CODES[s] for s in self.stages]

    @property
    def verdict_code(self) -> int:
        return STAGE_CODES[self.verdict]

    def summary(self) -> str:
        """One line, e.g. ``corruption stage: steps 200-450 (dip 0.41); verdict memorising; best step ...``."""
        if not self.corruption_detected:
            head = "corruption stage: none detected"
        elif self.corruption_ongoing:
            head = f"corruption stage: from step {self.corruption_start}, ongoing (dip {self.dip_depth:.3f})"
        else:
            head = f"corruption stage: steps {self.corruption_start}-{self.corruption_end} (dip {self.dip_depth:.3f})"
        best = "best step none"
        if self.best_step_before_corruption is not None:
            where = "best step before corruption" if self.corruption_detected else "best step"
            best = f"{where} {self.best_step_before_corruption} (fidelity {self.best_fidelity:.3f})"
        return f"{head}; verdict {self.verdict}; {best}"


def _values(name: str, values: Sequence[float] | None, n: int) -> list[float]:
    if values is None:
        return [math.nan] * n
    if len(values) != n:
        raise ValueError(f"classify_stages: {len(values)} {name} values for {n} steps")
    return [math.nan if v is None else float(v) for v in values]


def classify_stages(
    steps: Sequence[int],
    fidelity: Sequence[float],
    corruption: Sequence[float] | None = None,
    memorisation: Sequence[float] | None = None,
    *,
    dip: float = 0.3,
    dip_mode: str = "relative",
    min_dip: float = 0.1,
    noise_factor: float = 1.5,
    require_noise: bool = True,
    min_points: int = 1,
    memorisation_threshold: float = 0.95,
    levels: tuple[float, float] | None = None,
) -> StageReport:
    """Label every evaluated step and summarise the run (rules and defaults: module docstring).

    Args:
        steps: training step of each point (sorted here; need not be evenly spaced).
        fidelity: subject fidelity per point; NaN = not measured.
        corruption: corruption score per point (samples' high-frequency energy / the instance images'), or None
            when not measured (then only the fidelity dip counts, as with ``require_noise=False``).
        memorisation: nearest-instance similarity per point, or None (then nothing is labelled memorising).
        dip: fraction of the rise (``relative``) or absolute fidelity drop (``absolute``) that counts as a dip
            (default 0.3).
        dip_mode: ``relative`` (default) or ``absolute``.
        min_dip: smallest absolute drop that can count as a dip in either mode (default 0.1).
        noise_factor: corruption score above which samples count as noisy (default 1.5).
        require_noise: a dip is corruption only when the samples are also noisy (default True).
        min_points: consecutive flagged points needed for a corruption stage (default 1).
        memorisation_threshold: nearest-instance similarity from which a near-top point is memorising
            (default 0.95).
        levels: (class prior, ceiling) of the fidelity score, when measured: what the pretrained model already
            scores for the class, and what a perfect copy scores through the model's autoencoder. Then ``min_dip``
            (and an ``absolute`` ``dip``) are fractions of the span ceiling - prior instead of score units, so the
            rules mean the same on any backbone and model (default None: score units).
    """
    if dip_mode not in ("relative", "absolute"):
        raise ValueError(f"dip_mode must be 'relative' or 'absolute', got {dip_mode!r}")
    scale = 1.0
    if levels is not None and all(_finite(v) for v in levels):
        if levels[1] <= levels[0]:
            raise ValueError(f"classify_stages: levels {levels} must be (class prior, ceiling) with prior < ceiling")
        scale = levels[1] - levels[0]
    n = len(steps)
    fid = _values("fidelity", fidelity, n)
    score = _values("corruption", corruption, n)
    mem = _values("memorisation", memorisation, n)
    order = sorted(range(n), key=lambda i: steps[i])
    steps = [int(steps[i]) for i in order]
    fid, score, mem = ([v[i] for i in order] for v in (fid, score, mem))

    stages = ["unknown"] * n
    drops, thresholds = [math.nan] * n, [math.nan] * n
    flagged = [False] * n
    finite = [i for i in range(n) if _finite(fid[i])]
    first, running_max = None, -math.inf
    for i in finite:
        first = fid[i] if first is None else first
        running_max = max(running_max, fid[i])
        base = dip * (running_max - first) if dip_mode == "relative" else dip * scale
        thresholds[i] = max(min_dip * scale, base)
        drops[i] = running_max - fid[i]
        noisy = not _finite(score[i]) or score[i] > noise_factor
        flagged[i] = drops[i] > thresholds[i] and (noisy or not require_noise)

    # Runs of consecutive flagged points (over finite points only) become corruption when long enough.
    runs: list[list[int]] = []
    for k, i in enumerate(finite):
        if not flagged[i]:
            continue
        if k > 0 and flagged[finite[k - 1]]:
            runs[-1].append(i)
        else:
            runs.append([i])
    runs = [r for r in runs if len(r) >= max(1, min_points)]
    corrupted = {i for r in runs for i in r}

    for i in finite:
        if i in corrupted:
            stages[i] = "corruption"
        elif _finite(mem[i]) and mem[i] >= memorisation_threshold and drops[i] <= thresholds[i]:
            stages[i] = "memorising"
        else:
            stages[i] = "adapting"

    report = StageReport(
        steps=steps,
        stages=stages,
        drops=drops,
        thresholds=thresholds,
        verdict=stages[finite[-1]] if finite else "unknown",
        intervals=[(steps[r[0]], steps[r[-1]]) for r in runs],
        dip_depth=max((drops[i] for i in finite), default=0.0),
    )
    if runs:
        stage = runs[0]
        report.corruption_detected = True
        report.corruption_start, report.corruption_end = steps[stage[0]], steps[stage[-1]]
        report.corruption_ongoing = stage[-1] == finite[-1]
    before = [i for i in finite if not runs or i < runs[0][0]]
    if before:
        best = max(before, key=lambda i: (fid[i], -i))  # highest fidelity, earliest step on ties
        report.best_step_before_corruption, report.best_fidelity = steps[best], fid[best]
    return report
