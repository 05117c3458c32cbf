"""Stage rules on synthetic curves: rise-dip-recover, monotone, flat, memorising plateau, noise, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_ft.report.stage_rules import STAGE_CODES, classify_stages

STEPS = list(range(0, 1100, 100))
# DINO-like curve of the BNN paper: rise to a peak at 300, collapse 400-600, recover into copies.
RDR_FIDELITY = [0.36, 0.6, 0.8, 0.9, 0.55, 0.4, 0.5, 0.86, 0.93, 0.96, 0.97]
RDR_SCORE = [1.0, 1.0, 1.1, 1.1, 2.4, 3.0, 2.2, 1.2, 1.1, 1.0, 1.0]
RDR_MEMO = [0.4, 0.65, 0.85, 0.9, 0.6, 0.45, 0.55, 0.9, 0.96, 0.98, 0.99]


def test_rise_dip_recover_finds_the_stage_and_the_peak_before_it():
    r = classify_stages(STEPS, RDR_FIDELITY, RDR_SCORE, RDR_MEMO)
    assert r.corruption_detected and not r.corruption_ongoing
    assert (r.corruption_start, r.corruption_end) == (400, 600)
    assert r.intervals == [(400, 600)]
    assert r.best_step_before_corruption == 300 and r.best_fidelity == pytest.approx(0.9)
    assert r.dip_depth == pytest.approx(0.5)
    assert r.stages[:4] == ["adapting"] * 4
    assert r.stages[4:7] == ["corruption"] * 3
    assert r.stages[7] == "adapting"  # recovered, but not yet copying
    assert r.stages[8:] == ["memorising"] * 3
    assert r.verdict == "memorising" and r.verdict_code == STAGE_CODES["memorising"] == 2
    assert "steps 400-600" in r.summary() and "best step before corruption 300" in r.summary()


def test_stage_still_running_is_ongoing_and_the_verdict():
    r = classify_stages(STEPS[:6], RDR_FIDELITY[:6], RDR_SCORE[:6], RDR_MEMO[:6])
    assert r.corruption_ongoing and r.verdict == "corruption" and r.corruption_end == 500
    assert r.best_step_before_corruption == 300
    assert "ongoing" in r.summary()


def test_dip_without_noise_is_not_corruption_unless_noise_is_not_required():
    clean = [1.0] * len(STEPS)
    assert not classify_stages(STEPS, RDR_FIDELITY, clean, RDR_MEMO).corruption_detected
    r = classify_stages(STEPS, RDR_FIDELITY, clean, RDR_MEMO, require_noise=False)
    assert (r.corruption_start, r.corruption_end) == (400, 600)
    # Without a corruption score at all, the fidelity dip decides.
    assert classify_stages(STEPS, RDR_FIDELITY).intervals == [(400, 600)]


def test_monotone_rise_has_no_corruption_and_the_best_step_is_the_last():
    fidelity = np.linspace(0.3, 0.85, len(STEPS)).tolist()
    r = classify_stages(STEPS, fidelity, [3.0] * len(STEPS), [0.5] * len(STEPS))
    assert not r.corruption_detected and r.corruption_start is None and r.intervals == []
    assert r.best_step_before_corruption == 1000 and r.dip_depth == 0.0
    assert set(r.stages) == {"adapting"} and r.verdict == "adapting"
    assert r.summary().startswith("corruption stage: none detected")


def test_flat_curve_is_adapting_with_no_corruption():
    n = len(STEPS)
    r = classify_stages(STEPS, [0.5] * n, [2.0] * n, [0.6] * n)
    assert not r.corruption_detected and r.verdict == "adapting" and set(r.stages) == {"adapting"}
    assert r.best_step_before_corruption == 0  # ties go to the earliest step
    assert r.codes == [0] * n


def test_rise_then_plateau_at_high_memorisation_is_memorising():
    fidelity = [0.4, 0.7, 0.9, 0.95, 0.96, 0.96, 0.97, 0.96]
    memo = [0.45, 0.75, 0.9, 0.97, 0.98, 0.98, 0.99, 0.98]
    r = classify_stages(STEPS[:8], fidelity, [1.0] * 8, memo)
    assert not r.corruption_detected
    assert r.stages[:3] == ["adapting"] * 3 and r.stages[3:] == ["memorising"] * 5
    assert r.verdict == "memorising"
    assert classify_stages(STEPS[:8], fidelity, [1.0] * 8, memo, memorisation_threshold=0.995).verdict == "adapting"


def test_noise_below_the_threshold_is_not_a_dip():
    rng = np.random.default_rng(0)
    rise = np.minimum(np.linspace(0.3, 1.2, 40), 0.85)
    fidelity = (rise + rng.uniform(-0.04, 0.04, 40)).tolist()
    steps = list(range(0, 4000, 100))
    r = classify_stages(steps, fidelity, [2.5] * 40, [0.5] * 40)
    assert not r.corruption_detected and 0 < r.dip_depth < 0.1
    # The same fluctuation around a flat curve is also below the absolute floor.
    flat = (0.5 + rng.uniform(-0.04, 0.04, 40)).tolist()
    assert not classify_stages(steps, flat, [2.5] * 40).corruption_detected
    # ...but a floor below the noise would flag it: the floor is what protects flat curves.
    assert classify_stages(steps, flat, [2.5] * 40, min_dip=0.01).corruption_detected


def test_relative_threshold_scales_with_the_rise_and_absolute_mode_does_not():
    # A large rise (0.6): 0.3 x rise = 0.18, so a drop of 0.15 is not a dip; an absolute 0.1 would call it one.
    big = [0.3, 0.6, 0.9, 0.75, 0.9]
    assert classify_stages(STEPS[:5], big, [2.0] * 5).intervals == []
    assert classify_stages(STEPS[:5], big, [2.0] * 5, dip_mode="absolute", dip=0.1).intervals == [(300, 300)]
    # A small rise (0.2): the threshold is the floor min_dip = 0.1, so a drop of 0.12 is a dip; absolute 0.2 is not.
    small = [0.5, 0.6, 0.7, 0.58, 0.7]
    assert classify_stages(STEPS[:5], small, [2.0] * 5).intervals == [(300, 300)]
    assert classify_stages(STEPS[:5], small, [2.0] * 5, dip_mode="absolute", dip=0.2).intervals == []
    with pytest.raises(ValueError):
        classify_stages(STEPS[:5], small, dip_mode="percent")


def test_min_points_ignores_single_point_blips():
    fidelity = [0.3, 0.6, 0.9, 0.5, 0.9, 0.92, 0.5, 0.45, 0.9]
    r = classify_stages(STEPS[:9], fidelity, [2.0] * 9)
    assert r.intervals == [(300, 300), (600, 700)] and r.corruption_start == 300
    r = classify_stages(STEPS[:9], fidelity, [2.0] * 9, min_points=2)
    assert r.intervals == [(600, 700)] and r.stages[3] == "adapting"
    assert r.best_step_before_corruption == 500


def test_edge_cases_single_point_nan_and_unsorted():
    single = classify_stages([0], [0.5], [1.0], [0.2])
    assert single.verdict == "adapting" and single.best_step_before_corruption == 0 and not single.corruption_detected
    empty = classify_stages([], [])
    assert empty.verdict == "unknown" and empty.best_step_before_corruption is None and empty.dip_depth == 0.0
    nan = math.nan
    assert classify_stages([0, 1], [nan, nan]).verdict == "unknown"
    # NaN points are unknown and neither break nor extend a run; NaN scores do not veto.
    r = classify_stages([0, 100, 200, 300, 400, 500], [0.3, 0.9, 0.4, nan, 0.45, nan], [1.0, 1.0, 2.0, 2.0, nan, 1.0])
    assert r.stages == ["adapting", "adapting", "corruption", "unknown", "corruption", "unknown"]
    assert r.intervals == [(200, 400)] and r.corruption_ongoing and r.verdict == "corruption"
    # Steps are sorted before the rules run.
    shuffled = [5, 2, 0, 9, 7, 3, 1, 10, 4, 8, 6]
    r = classify_stages(
        [STEPS[i] for i in shuffled], [RDR_FIDELITY[i] for i in shuffled], [RDR_SCORE[i] for i in shuffled]
    )
    assert r.steps == STEPS and r.intervals == [(400, 600)] and r.best_step_before_corruption == 300
    with pytest.raises(ValueError):
        classify_stages([0, 1], [0.5, 0.6], [1.0])


def test_levels_make_the_rules_the_same_on_any_score_scale():
    """The same run scored on two backbones of different scale (prior/ceiling 0.2/0.4 and 0.0/1.0: one is the other
    stretched) gets the same stages once the levels are given; without them the small scale hides the dip."""
    progress = [0.0, 0.5, 0.9, 0.55, 0.6, 0.95]  # a rise, a dip of 0.35 of the span, a recovery
    steps, noisy = [0, 100, 200, 300, 400, 500], [1.0, 1.0, 1.0, 2.0, 2.0, 1.0]
    narrow = [0.2 + 0.2 * p for p in progress]  # the dip is 0.07 in score units: under min_dip=0.1
    wide = [0.0 + 1.0 * p for p in progress]
    plain = classify_stages(steps, narrow, noisy, dip=0.3)
    assert not plain.corruption_detected
    with_levels = classify_stages(steps, narrow, noisy, dip=0.3, levels=(0.2, 0.4))
    reference = classify_stages(steps, wide, noisy, dip=0.3, levels=(0.0, 1.0))
    assert with_levels.stages == reference.stages and with_levels.intervals == [(300, 400)]
    assert with_levels.thresholds[3] == pytest.approx(0.2 * reference.thresholds[3])
    with pytest.raises(ValueError, match="prior < ceiling"):
        classify_stages(steps, narrow, noisy, levels=(0.4, 0.2))
    # An unknown level (NaN) leaves the score units in place.
    assert classify_stages(steps, narrow, noisy, levels=(math.nan, 0.4)).stages == plain.stages
