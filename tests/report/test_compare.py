"""The comparison report: ranking by what the monitors measured, labels, the page and the command line."""

from __future__ import annotations

import csv

import pytest
from report_fixtures import DIP, make_run

from lightning_ft.report.__main__ import main
from lightning_ft.report.compare import choose_ranking, rank, run_labels, write_comparison
from lightning_ft.report.run_folder import read_run
from lightning_ft.report.run_report import summarise


def _shifted(offset: float):
    return [(s, f + offset, c, stage) for s, f, c, stage in DIP]


def _table(path) -> list[dict]:
    with open(path / "comparison.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_fid_ranks_when_every_run_has_it_lowest_first(tmp_path):
    runs = [make_run(tmp_path, name, fid=[90.0, fid]) for name, fid in (("a", 40.0), ("b", 20.0), ("c", 30.0))]
    page = write_comparison(runs, tmp_path / "out")
    table = _table(tmp_path / "out")
    assert [r["run"] for r in table] == ["b", "c", "a"] and [r["rank"] for r in table] == ["1", "2", "3"]
    assert [r["FID (final)"] for r in table] == ["20.00", "30.00", "40.00"]
    assert "Ranked by the final FID, lowest first" in page.read_text()


def test_progress_at_the_recommended_step_ranks_without_fid_highest_first(tmp_path):
    runs = [make_run(tmp_path, name, curve=_shifted(offset)) for name, offset in (("low", 0.0), ("high", 0.1))]
    runs.append(make_run(tmp_path, "none", corruption=False))
    write_comparison(runs, tmp_path / "out")
    table = _table(tmp_path / "out")
    assert [r["run"] for r in table] == ["high", "low", "none"], "a run without the monitor goes last, unranked"
    assert [r["rank"] for r in table] == ["1", "2", "-"]
    assert table[0]["recommended step"] == "20" and table[0]["verdict"] == "memorising"


def test_choose_and_apply_a_ranking():
    summaries = [{"fid": None, "progress": 0.2, "fidelity": 0.5}, {"fid": None, "progress": None, "fidelity": 0.7}]
    key, why = choose_ranking(summaries)
    assert key == "fidelity" and "not every run measured the levels" in why  # one run lacks progress
    assert [s["fidelity"] for s in rank(summaries, key)] == [0.7, 0.5]
    mixed = [{"fid": 3.0, "progress": None, "fidelity": None}, {"fid": None, "progress": 0.1, "fidelity": 0.5}]
    assert choose_ranking(mixed)[0] == "fid", "each key is held by one run: the first in order wins"
    assert choose_ranking([{"fid": None, "progress": None, "fidelity": None}])[0] is None
    assert rank(summaries, None) == summaries
    assert choose_ranking(summaries, "final_loss")[0] == "final_loss"
    with pytest.raises(ValueError, match="rank='speed': choose one of"):
        choose_ranking(summaries, "speed")


def test_labels_are_short_and_distinct(tmp_path):
    a = tmp_path / "sweep" / "lightning_logs" / "version_0"
    b = tmp_path / "sweep" / "lightning_logs" / "version_1"
    c = tmp_path / "other" / "seed0" / "lightning_logs" / "version_0"
    d = tmp_path / "other" / "seed1" / "lightning_logs" / "version_0"
    assert run_labels([a, b]) == ["version_0", "version_1"]
    assert run_labels([c, d]) == ["seed0", "seed1"], "the version every run shares is left out"
    assert run_labels([a, c]) == ["sweep", "other/seed0"]
    assert run_labels([a]) == ["sweep / version_0"]


def test_command_line_one_run_gives_its_report_several_a_comparison(tmp_path, capsys):
    a = make_run(tmp_path, "a", fid=[50.0])
    b = make_run(tmp_path, "b", fid=[40.0])
    assert main([str(a)]) == 0
    assert (a / "report.html").exists() and "run report written" in capsys.readouterr().out
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    html = (tmp_path / "cmp" / "comparison.html").read_text()
    assert "Comparison of 2 runs" in html and (tmp_path / "cmp" / "figures" / "curves.png").exists()
    assert 'href="../a/lightning_logs/version_0/report.html"' in html, "links the run report that exists"
    assert main([str(tmp_path)]) == 0, "a folder above several runs compares them all"
    assert (tmp_path / "comparison" / "comparison.html").exists()
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert summarise(read_run(b))["fid"] == 40.0


def test_a_sweeps_rows_say_what_was_swept(tmp_path):
    runs = []
    for name, lr in (("a", 1e-3), ("b", 1e-4)):
        folder = make_run(tmp_path, name, fid=[50.0])
        (folder / "config.yaml").write_text((folder / "config.yaml").read_text().replace("lr: 0.0001", f"lr: {lr}"))
        runs.append(folder)
    write_comparison(runs, tmp_path / "out")
    assert [r["settings that differ"] for r in _table(tmp_path / "out")] == ["lr=0.001", "lr=0.0001"]
