"""The corruption-stage benchmark's pure parts: the dip read from a curve, the bootstrap interval of the BNN effect,
the experiment copy the runs use, and the reuse of finished runs."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.corruption_stage import (
    bench_config,
    bootstrap_mean_difference,
    dip_summary,
    estimate_seconds,
    finished_log_dir,
)
from lightning_ft.report.stage_rules import classify_stages

STEPS = [0, 25, 50, 75, 100, 125, 150, 175, 200]


def test_a_known_noisy_dip_is_measured_with_its_depth_step_and_duration():
    # Rises 0.2 -> 0.8 by step 75, collapses to 0.5 at 100-125 with noisy samples, recovers by 150.
    fidelity = [0.2, 0.5, 0.7, 0.8, 0.5, 0.55, 0.78, 0.8, 0.82]
    score = [0.5, 0.7, 0.8, 0.9, 2.0, 1.8, 1.0, 0.9, 0.9]
    report = classify_stages(STEPS, fidelity, score, levels=(0.3, 0.9))
    dip = dip_summary(report, fidelity)
    assert dip["depth"] == pytest.approx(0.3)
    assert (dip["dip_step"], dip["peak_step"]) == (100, 75)
    # flagged at 100 and 125 (drops 0.3 and 0.25 > max(0.06, 0.3 x 0.6) = 0.18), recovered at 150: 50 steps.
    assert (dip["start"], dip["end"], dip["duration"], dip["ongoing"]) == (100, 125, 50, False)
    assert dip["flagged_steps"] == 50


def test_the_same_dip_with_clean_samples_counts_only_under_the_fidelity_only_rule():
    fidelity = [0.2, 0.5, 0.7, 0.8, 0.5, 0.55, 0.78, 0.8, 0.82]
    clean = [0.9] * len(STEPS)
    monitor = dip_summary(classify_stages(STEPS, fidelity, clean, levels=(0.3, 0.9)), fidelity)
    only = dip_summary(classify_stages(STEPS, fidelity, clean, require_noise=False, levels=(0.3, 0.9)), fidelity)
    assert monitor["depth"] == only["depth"] == pytest.approx(0.3)  # depth does not depend on the rule
    assert (monitor["start"], monitor["duration"]) == (None, 0)
    assert (only["start"], only["duration"]) == (100, 50)


def test_a_dip_lasting_to_the_end_is_ongoing_and_counts_one_interval_past_the_last_step():
    fidelity = [0.2, 0.5, 0.7, 0.8, 0.8, 0.8, 0.8, 0.5, 0.4]
    report = classify_stages(STEPS, fidelity, require_noise=False)
    dip = dip_summary(report, fidelity)
    assert (dip["start"], dip["end"], dip["ongoing"], dip["duration"]) == (175, 200, True, 50)
    assert (dip["depth"], dip["dip_step"]) == (pytest.approx(0.4), 200)
    # the peak is reached first at step 75: the dip is measured from there
    assert dip["peak_step"] == 75


def test_a_rising_curve_has_no_dip():
    fidelity = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9]
    dip = dip_summary(classify_stages(STEPS, fidelity, [3.0] * len(STEPS)), fidelity)
    assert dip == {"depth": 0.0, "dip_step": None, "peak_step": None, "start": None, "end": None, "duration": 0,
                   "ongoing": False, "flagged_steps": 0}  # fmt: skip


def test_the_bootstrap_interval_of_identical_samples_is_a_point():
    assert bootstrap_mean_difference([0.1, 0.1, 0.1], [0.1, 0.1, 0.1]) == (0.0, 0.0, 0.0)
    diff, low, high = bootstrap_mean_difference([0.2, 0.2, 0.2], [0.05, 0.05, 0.05])
    assert diff == pytest.approx(-0.15) and low == pytest.approx(-0.15) and high == pytest.approx(-0.15)


def test_the_bootstrap_interval_is_seeded_brackets_the_difference_and_stays_within_the_extremes():
    baseline, bnn = [0.30, 0.10, 0.20], [0.05, 0.15, 0.10]
    first = bootstrap_mean_difference(baseline, bnn, resamples=10_000, seed=0)
    assert first == bootstrap_mean_difference(baseline, bnn, resamples=10_000, seed=0)
    diff, low, high = first
    assert diff == pytest.approx(0.10 - 0.20)
    assert min(bnn) - max(baseline) <= low < diff < high <= max(bnn) - min(baseline)
    # the sign is BNN minus baseline
    assert bootstrap_mean_difference(bnn, baseline, seed=0)[0] == pytest.approx(0.10)


def test_the_bootstrap_interval_matches_the_exact_resampling_distribution():
    # Two values per group: each resampled mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the difference
    # of two independent ones is -1 with probability 1/16: the 2.5% quantile is -1, the 97.5% quantile +1.
    diff, low, high = bootstrap_mean_difference([0.0, 1.0], [0.0, 1.0], resamples=20_000, seed=1)
    assert (diff, low, high) == (0.0, -1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_mean_difference([], [1.0])


def test_the_run_config_keeps_the_method_and_sets_the_monitor_protocol():
    config = bench_config("dreambooth_lora_bnn", every=25, sample_seeds=16, grid_every=0)
    paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert paths == ["lightning_ft.callbacks.SampleGridLogger", "benchmarks.corruption_stage.SampleSavingMonitor"]
    monitor = config["trainer"]["callbacks"][1]["init_args"]
    assert monitor["every_n_steps"] == 25 and monitor["seeds"] == list(range(16))
    # The monitor's ceiling comes from the data config merged into the run's copy: its held-out subject renders.
    assert "heldout_dir" not in monitor
    data = config["data"]["init_args"]
    assert data["heldout_dir"] == "${embedded:subject}/heldout" and data["instance_dir"] == "${embedded:subject}/train"
    assert "instance_prompt" not in data and data["class_prompt"] == "a orange star on a gray background"
    assert data["batch_size"] == 4
    assert config["trainer"]["enable_checkpointing"] is False
    assert config["model"]["class_path"] == "lightning_ft.methods.BayesianFineTuning"
    assert config["model"]["init_args"]["trainable"] == "lora" and config["data"]["init_args"]["num_class_images"] == 50


def test_only_a_run_with_its_final_row_and_the_same_settings_is_reused(tmp_path):
    settings = {"steps": 50, "seed": 0}
    log = tmp_path / "lightning_logs" / "version_0"
    log.mkdir(parents=True)
    (tmp_path / "bench.json").write_text(json.dumps({"settings": settings}))
    (log / "corruption_stage.csv").write_text("step,fidelity\n0,0.1\n25,0.3\n")
    assert finished_log_dir(tmp_path, 50, settings) is None  # interrupted at step 25
    (log / "corruption_stage.csv").write_text("step,fidelity\n0,0.1\n25,0.3\n50,0.4\n")
    assert finished_log_dir(tmp_path, 50, settings) == log
    assert finished_log_dir(tmp_path, 50, {"steps": 50, "seed": 1}) is None  # other settings: run again


def test_the_time_estimate_counts_steps_and_evaluations():
    short, long = estimate_seconds("released", False, 300, 25, 0), estimate_seconds("released", False, 600, 25, 0)
    per_step_and_evals = long - short
    assert per_step_and_evals > 0 and not math.isnan(per_step_and_evals)
    assert estimate_seconds("released", False, 300, 25, 0) < estimate_seconds("released", False, 300, 5, 0)
    # grids every 100 steps: at 100, 200 and 300 (the end); end only: one
    assert estimate_seconds("lora", True, 300, 25, 100) > estimate_seconds("lora", True, 300, 25, 0)


def test_a_strip_of_sixteen_samples_is_rewrapped_into_two_rows_of_eight_in_order():
    from PIL import Image

    from benchmarks.corruption_stage import wrap_strip

    strip = Image.new("L", (16 * 4, 4))
    for k in range(16):
        strip.paste(k * 10, (k * 4, 0, k * 4 + 4, 4))
    grid = wrap_strip(strip, 8)
    assert grid.size == (32, 8)
    assert [grid.getpixel((c * 4 + 1, r * 4 + 1)) for r in range(2) for c in range(8)] == [k * 10 for k in range(16)]
