"""The ControlNet benchmark's statistics: its convergence reading, the t-interval over seeds, the speed-up and its
bootstrap, and the exact permutation test, on values whose answers are known."""

from __future__ import annotations

import math

import pytest

from benchmarks.controlnet import analyse, permutation_p, speedup, t_interval


def test_t_interval_is_students():
    mean, half, n = t_interval([1.0, 2.0, 3.0, None, float("nan")])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) x sd / sqrt(n)
    assert math.isnan(t_interval([5.0])[1]) and t_interval([])[2] == 0


def test_speedup_is_the_share_of_steps_saved_with_a_bootstrap_interval():
    value, low, high = speedup([100.0, 90.0, 110.0], [70.0, 80.0, 80.0])
    assert value == pytest.approx(1 - (230 / 3) / 100)
    assert low <= value <= high
    same, low, high = speedup([100.0, 100.0], [100.0, 100.0])
    assert (same, low, high) == (0.0, 0.0, 0.0)
    assert all(math.isnan(v) for v in speedup([], [1.0]))


def test_the_permutation_test_counts_every_split():
    # 3 + 3 runs, every plain run slower than every Diff-Tuning run: only the observed split and its mirror are as
    # extreme, 2 of the 20 splits.
    assert permutation_p([100.0, 90.0, 110.0], [70.0, 80.0, 80.0]) == pytest.approx(0.1)
    assert permutation_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0


def test_convergence_is_the_first_evaluation_it_stays_above():
    curve = {"step": [0, 10, 20, 30, 40], "iou": [0.2, 0.7, 0.5, 0.65, 0.8], "iou_low": [0.1] * 5,
             "iou_high": [0.9] * 5, "ceiling": [0.98] * 5}  # fmt: skip
    result = analyse(curve, threshold=0.6)
    assert result["convergence_step"] == 30  # step 10 passed, but the dip at 20 resets it
    assert (result["iou_at_convergence"], result["final_iou"], result["peak_iou"]) == (0.65, 0.8, 0.8)
    assert analyse({**curve, "iou": [0.2, 0.7, 0.7, 0.7, 0.5]}, 0.6)["convergence_step"] is None
