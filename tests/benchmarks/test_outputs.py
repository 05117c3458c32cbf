"""Result writers of the benchmarks: a figure is written and closed, or closed without writing when drawing fails
(the domain-transfer tables: tests/benchmarks/test_domain_transfer.py)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from benchmarks.tables import saved_figure


def test_saved_figure_closes_the_figure_even_when_drawing_fails(tmp_path):
    try:
        with saved_figure(tmp_path / "f.png", 2, (4, 2)) as axes:
            assert len(axes) == 2
            raise RuntimeError("drawing failed")
    except RuntimeError:
        pass
    assert not plt.get_fignums() and not (tmp_path / "f.png").exists()
