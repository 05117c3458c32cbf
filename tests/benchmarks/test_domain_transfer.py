"""The domain-transfer benchmark's statistics and tables: t-intervals over seeds, differences paired by seed, the
summary rows, both tables' markdown, the mask-rate table, the expected run time (finished runs cost nothing) and
the comparison grid."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest

from benchmarks import domain_transfer as dt


def _row(method, seed, fid, source=None, key="plain", mask_rate=None, diversity=0.5, cpu=10.0, mask_table=False):
    return {"method": method, "key": key, "mask_rate": mask_rate, "mask_table": mask_table, "seed": seed,
            "target_fid": fid,
            "target_kid_x1000": fid * 10, "target_diversity": diversity, "trainable_params": 1000 if seed is not None
            else 0, "source_fid": math.nan if source is None else source, "source_kid_x1000": math.nan,
            "fit_cpu_seconds": cpu if seed is not None else math.nan, "fit_seconds": cpu, "target_reference": 2000,
            "source_reference": 2000, "samples": 8}  # fmt: skip


def test_t_interval_is_the_student_t_half_width_and_ignores_unmeasured_values():
    mean, half, n = dt.t_interval([1.0, 2.0, 3.0, math.nan])
    # sd 1, n 3: t(0.975, 2) = 4.3027 (a normal quantile, 1.96, would give 1.13)
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert dt.t_interval([5.0, 5.0])[1] == 0.0
    mean, half, n = dt.t_interval([7.0])
    assert mean == 7.0 and math.isnan(half) and n == 1
    assert dt.t_interval([])[2] == 0 and math.isnan(dt.t_interval([None])[0])


def test_differences_are_paired_by_seed_not_by_position():
    base = [_row("plain", 0, 10.0), _row("plain", 1, 20.0), _row("plain", 2, math.nan)]
    rows = [_row("m", 1, 18.0), _row("m", 0, 11.0), _row("m", 2, 5.0), _row("m", 3, 1.0)]
    # seed 1: 18 - 20, seed 0: 11 - 10; seed 2's baseline was not measured, seed 3 has none
    assert dt.paired_differences(rows, base, "target_fid") == [-2.0, 1.0]


def test_format_ci():
    assert dt.format_ci(12.345, 1.2) == "12.35 ± 1.20"
    assert dt.format_ci(-3.0, 0.5, 1, signed=True) == "-3.0 ± 0.5"
    assert dt.format_ci(3.0, 0.5, 1, signed=True) == "+3.0 ± 0.5"
    assert dt.format_ci(3.0, math.nan) == "3.00" and dt.format_ci(math.nan, 1.0) == "-"


def test_summary_pairs_each_method_with_the_baseline_and_leaves_the_pretrained_row_without_interval():
    rows = [_row("no fine-tuning", None, 100.0, 2.0, key="pretrained"),
            _row("plain", 0, 20.0, 40.0), _row("plain", 1, 22.0, 44.0), _row("plain", 2, 30.0, 42.0),
            _row("DT", 0, 18.0, 30.0, "diff_tuning"), _row("DT", 1, 21.0, 35.0, "diff_tuning"),
            _row("DT", 2, 27.0, 40.0, "diff_tuning")]  # fmt: skip
    summary = {s["method"]: s for s in dt.summarise(rows, "plain")}
    pre, plain, method = summary["no fine-tuning"], summary["plain"], summary["DT"]
    assert pre["seeds"] == 0 and pre["target_fid_mean"] == 100.0 and math.isnan(pre["target_fid_ci"])
    assert math.isnan(pre["target_fid_diff_mean"])  # one unpaired measurement: no paired difference
    assert plain["target_fid_mean"] == pytest.approx(24.0) and plain["target_fid_diff_mean"] == 0.0
    # paired: -2, -1, -3 -> mean -2, sd 1 (the unpaired means differ by the same -2, but their seeds' spread,
    # sd 5.3 and 4.6, would hide it)
    assert method["target_fid_diff_mean"] == pytest.approx(-2.0)
    assert method["target_fid_diff_ci"] == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert method["source_fid_diff_mean"] == pytest.approx(-7.0) and method["source_fid_diff_n"] == 3
    assert method["target_fid_change_pct"] == pytest.approx(100 * (22.0 / 24.0 - 1))
    assert method["fit_cpu_seconds_mean"] == 10.0 and method["trainable_params"] == 1000


def _args(table, tmp_path, **kw):
    base = dict(table=table, model="t2i", steps=10, seeds=[0, 1], samples=8, sample_steps=5, guidance=2.0,
                reference=9, source=table == "forgetting", root=str(tmp_path / "root"), methods=["plain"],
                mask_rates=[0.0, 0.5], plain_name="plain fine-tune" if table == "forgetting" else "full fine-tune",
                lr=None, extra=[], jobs=1, mask_samples=4, device="cpu", precision="32-true")  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_forgetting_table_has_intervals_paired_differences_and_every_run_in_the_csv(tmp_path):
    rows = [_row("no fine-tuning", None, 100.0, 2.0, key="pretrained"),
            _row("plain fine-tune", 0, 20.0, 40.0), _row("plain fine-tune", 1, 22.0, 44.0),
            _row("SDFT", 0, 15.0, 30.0, "sdft"), _row("SDFT", 1, 18.0, 33.0, "sdft")]  # fmt: skip
    dt.write_outputs(rows, tmp_path / "out", _args("forgetting", tmp_path))
    table = (tmp_path / "out.md").read_text()
    half = 12.7062 * math.sqrt(2) / math.sqrt(2)  # t(0.975, 1) x sd / sqrt(n), sd of (20, 22) = sqrt(2)
    assert f"| plain fine-tune | 2 | 21.00 ± {half:.2f} |" in table
    assert "| no fine-tuning | - | 100.00 | 1000.0 | - | 2.00 |" in table
    # SDFT - plain by seed: -5, -4 (target), -10, -11 (source)
    sdft = next(line for line in table.splitlines() if line.startswith("| SDFT"))
    assert "| -4.50 ± 6.35 |" in sdft and "| -10.50 ± 6.35 |" in sdft
    assert "8 samples per model and set" in table and "95% Student-t" in table
    with open(tmp_path / "out.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 5
    with open(tmp_path / "out_summary.csv") as handle:
        assert [r["method"] for r in csv.DictReader(handle)] == ["no fine-tuning", "plain fine-tune", "SDFT"]


def test_peft_table_gives_parameter_shares_and_anl_against_the_mask_rate(tmp_path):
    anl = dict(key="anl", mask_table=True)
    rows = [_row("full fine-tune", 0, 20.0), _row("full fine-tune", 1, 22.0),
            _row("ANL (mask 0.5)", 0, 25.0, key="anl", mask_rate=0.5), _row("ANL (mask 0.5)", 1, 27.0, key="anl",
            mask_rate=0.5), _row("ANL (mask 0, 8)", 0, 30.0, mask_rate=0.0, diversity=0.40, **anl),
            _row("ANL (mask 0, 8)", 1, 31.0, mask_rate=0.0, diversity=0.50, **anl),
            _row("ANL (mask 0.5, 8)", 0, 33.0, mask_rate=0.5, diversity=0.45, **anl),
            _row("ANL (mask 0.5, 8)", 1, 35.0, mask_rate=0.5, diversity=0.54, **anl)]  # fmt: skip
    for row in rows[2:]:
        row["trainable_params"] = 250
    dt.write_outputs(rows, tmp_path / "out", _args("peft", tmp_path))
    table = (tmp_path / "out.md").read_text()
    main = table.split("\n\n")[1]
    assert "| ANL (mask 0.5) | 2 | 250 | 25.0% |" in main and "| full fine-tune | 2 | 1,000 | 100.0% |" in main
    assert "| +5.00 ± 0.00 |" in main  # ANL - full by seed: +5, +5
    assert "source" not in main and "mask 0, 8" not in main  # no source column; the rate rows are apart
    # diversity paired with mask 0 by seed: +0.05, +0.04 -> +0.045; FID: +3, +4 -> +3.5
    line = next(line for line in table.splitlines() if line.startswith("| 0.5 |"))
    assert "| +0.0450 ± 0.0635 |" in line and "| +3.50 ± 6.35 |" in line
    assert next(line for line in table.splitlines() if line.startswith("| 0 |")).count("+0.0000 ± 0.0000") == 1


def test_expected_time_counts_only_what_is_left_to_do(tmp_path):
    args = _args("forgetting", tmp_path, methods=["plain", "anl"], seeds=[0], mask_rates=[0.0, 0.5])
    seconds, fits, scorings = dt.expected_seconds(args)
    # renders and their round trip, pretrained, plain, ANL's main row and two rates
    assert (fits, scorings) == (2, 2 + 1 + 1 + 1 + 2)
    # the plain run finished and was scored (with its source set): only ANL is left
    run = dt.run_root("plain", 0, args)
    (run / "lightning_logs/version_0/export").mkdir(parents=True)
    (run / "lightning_logs/version_0/export/model_index.json").write_text("{}")
    dt.scores_path(run, args, None).write_text(json.dumps({"source_fid": 3.0}))
    less, fits, scorings = dt.expected_seconds(args)
    assert (fits, scorings) == (1, 2 + 1 + 1 + 2) and less < seconds
    # a score without the source set does not count as done for a table that needs it
    dt.scores_path(run, args, None).write_text(json.dumps({"source_fid": float("nan")}))
    assert dt.expected_seconds(args)[2] == 7
    assert dt.expected_seconds(_args("peft", tmp_path, methods=["plain"], seeds=[0]))[2] == 3  # all but plain


def test_settings_of_a_run_hold_the_sweeps_lr_only_for_full_fine_tunes(tmp_path):
    args = _args("peft", tmp_path, lr=3e-4)
    assert "--model.init_args.lr=0.0003" in dt.run_settings("plain", args)["overrides"]
    assert "--model.init_args.lr=0.0003" not in dt.run_settings("a3fta", args)["overrides"]
    lora = dt.run_settings("lora", args)["overrides"]
    assert "--model.init_args.trainable=lora" in lora and "--model.init_args.lr=1e-3" in lora


def test_comparison_grid_writes_one_labelled_png_and_closes_it(tmp_path):
    rows = [("real", np.zeros((16, 3, 32, 32), np.uint8)), ("model", np.full((8, 3, 32, 32), 200, np.uint8))]
    dt.comparison_grid(rows, tmp_path / "g.png", "title", "columns")
    assert (tmp_path / "g.png").stat().st_size > 0 and not plt.get_fignums()


def test_device_and_precision_reach_every_fit(tmp_path):
    args = _args("peft", tmp_path, device="cuda", precision="bf16-mixed")
    overrides = dt.run_settings("plain", args)["overrides"]
    assert overrides[overrides.index("--trainer.accelerator") + 1] == "gpu"
    assert overrides[overrides.index("--trainer.precision") + 1] == "bf16-mixed"
    assert "--trainer.accelerator" not in dt.run_settings("plain", _args("peft", tmp_path))["overrides"]
