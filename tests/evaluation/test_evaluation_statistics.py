"""The evaluation's numbers: t-intervals (against scipy), per-sample similarity and the leave-one-out real-images
score, on features whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ft.evaluation.statistics import estimate, leave_one_out, mean_similarity, t_quantile
from lightning_ft.metrics import subject_fidelity


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 30, 200])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.975, 0.995])
def test_t_quantile_matches_scipy(df, p):
    stats = pytest.importorskip("scipy.stats")
    assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), abs=1e-5)


def test_t_quantile_refuses_what_it_cannot_give():
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)
    with pytest.raises(ValueError, match="p must"):
        t_quantile(0.2, 3)


def test_estimate_is_the_mean_with_the_t_interval():
    values = [0.2, 0.4, 0.5, 0.9]
    e = estimate(values)
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    half = 3.182446305284263 * sd / 2  # t(0.975, 3) * s / sqrt(4)
    assert (e.n, e.mean) == (4, pytest.approx(mean))
    assert (e.low, e.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert e.low < e.mean < e.high


def test_the_interval_contains_the_mean_and_shrinks_with_n():
    rng = torch.Generator().manual_seed(0)
    widths = []
    for n in (4, 16, 64, 256):
        e = estimate(torch.rand(n, generator=rng))
        assert e.low <= e.mean <= e.high and e.n == n
        widths.append(e.high - e.low)
    assert widths == sorted(widths, reverse=True)
    # The same spread, more samples: narrower by about sqrt(4) (and by the t quantile).
    small, large = estimate([0.0, 1.0] * 2), estimate([0.0, 1.0] * 8)
    assert (large.high - large.low) < (small.high - small.low) / 2


def test_nan_scores_are_not_counted_and_one_score_has_no_interval():
    e = estimate([0.5, float("nan"), 0.7])
    assert e.n == 2 and e.mean == pytest.approx(0.6)
    one = estimate([0.3])
    assert one.n == 1 and one.mean == 0.3 and math.isnan(one.low) and math.isnan(one.high)
    none = estimate([float("nan")])
    assert none.n == 0 and math.isnan(none.mean)
    assert none.as_dict() == {"mean": None, "low": None, "high": None, "n": 0}


def test_the_interval_is_clipped_to_the_score_range():
    e = estimate([1.0, 1.0, 0.0], bounds=(0.0, 1.0))  # mean 0.667 +- 1.43
    assert (e.low, e.mean, e.high) == (0.0, pytest.approx(2 / 3), 1.0)
    assert estimate([1.0, 1.0, 0.0]).high > 1.0  # unclipped, the t-interval passes the top of an accuracy


def test_mean_similarity_is_the_per_sample_dreambooth_score():
    g, r = torch.randn(5, 8), torch.randn(3, 8)
    per_sample = mean_similarity(g, r)
    assert per_sample.shape == (5,)
    assert float(per_sample.mean()) == pytest.approx(subject_fidelity(g, r), abs=1e-6)
    # Features of one direction score 1 whatever their length; opposite directions -1.
    assert mean_similarity(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0], [5.0, 0.0]])).item() == 1.0
    assert mean_similarity(torch.tensor([[-1.0, 0.0]]), torch.tensor([[3.0, 0.0]])).item() == -1.0


def test_leave_one_out_leaves_each_reference_out():
    # a and b at 60 degrees, c orthogonal to both's plane: each reference's mean similarity to the two others.
    a, b, c = torch.tensor([1.0, 0, 0]), torch.tensor([0.5, math.sqrt(3) / 2, 0]), torch.tensor([0, 0, 1.0])
    loo = leave_one_out(torch.stack([a, b, c]))
    torch.testing.assert_close(loo, torch.tensor([0.25, 0.25, 0.0]))
    # Identical references score exactly 1 (not (1 + ...) / n, what counting each with itself would give) ...
    torch.testing.assert_close(leave_one_out(torch.ones(4, 3)), torch.ones(4))
    # ... and two orthogonal ones 0, where counting each with itself would give 0.5.
    torch.testing.assert_close(leave_one_out(torch.eye(2)), torch.zeros(2))
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(torch.ones(1, 3), "data.heldout_dir")
