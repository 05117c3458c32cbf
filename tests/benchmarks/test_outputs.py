"""Result writers of the quality benchmarks: the table holds every run, with mean ± std over seeds, and the figure
is written (and closed) beside it."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import matplotlib.pyplot as plt

from benchmarks.domain_transfer import mean_std, write_outputs
from benchmarks.tables import saved_figure


def _row(method, seed, fid):
    return {"method": method, "seed": seed, "target_fid": fid, "target_kid_x1000": fid * 10, "target_diversity": 0.5,
            "source_fid": 2 * fid, "source_kid_x1000": 1.0, "trainable_params": 1234, "fit_seconds": 10.0,
            "target_reference": 2000}  # fmt: skip


def test_domain_transfer_table_averages_seeds_and_compares_to_plain(tmp_path):
    rows = [_row("plain fine-tune", 0, 20.0), _row("plain fine-tune", 1, 22.0), _row("SDFT", 0, 15.0),
            _row("SDFT", 1, 18.0)]  # fmt: skip
    args = SimpleNamespace(model="dit", steps=10, seeds=[0, 1], samples=8, sample_steps=5, guidance=2.0, reference=9)
    write_outputs(rows, tmp_path / "out", args)
    table = (tmp_path / "out.md").read_text()
    assert "| plain fine-tune | 2 | 21.00 ± 1.41 |" in table
    assert "| SDFT | 2 | 16.50 ± 2.12 |" in table and "| -21.4% |" in table  # 16.5 / 21 - 1
    with open(tmp_path / "out.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert (tmp_path / "out.png").stat().st_size > 0 and not plt.get_fignums()
    assert mean_std([3.0]) == "3.00" and mean_std([]) == "-"


def test_saved_figure_closes_the_figure_even_when_drawing_fails(tmp_path):
    try:
        with saved_figure(tmp_path / "f.png", 2, (4, 2)) as axes:
            assert len(axes) == 2
            raise RuntimeError("drawing failed")
    except RuntimeError:
        pass
    assert not plt.get_fignums() and not (tmp_path / "f.png").exists()
