"""The identity decoy benchmark's pure parts: decoy specs and the table (no feature network, no training)."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks import identity_decoys as bench
from lightning_ft.embedded import shapes, targets

FIELDS = [f.name for f in dataclasses.fields(shapes.ShapeSpec)]


def _differing(a: shapes.ShapeSpec, b: shapes.ShapeSpec) -> set[str]:
    return {f for f in FIELDS if getattr(a, f) != getattr(b, f)}


def test_decoys_keep_the_subjects_poses_and_change_only_what_they_name():
    subject = bench.decoy_specs(bench.decoys()[0], 6)
    assert all(s.shape == "star" and s.color == "orange" and s.stripes == targets.SUBJECT["stripes"] for s in subject)
    expected = {"background": {"background"}, "shape": {"shape"}, "pattern": {"stripes"}, "stripe colour": {"stripes"},
                "stripe width": {"stripes"}, "base colour": {"color", "stripes"}}  # fmt: skip
    for decoy in bench.decoys()[1:]:
        specs = bench.decoy_specs(decoy, 6)
        if decoy.role == bench.CEILING:
            assert specs == subject
            continue
        for s, ref in zip(specs, subject):
            assert _differing(s, ref) == expected[decoy.attribute], decoy.name


def test_near_variants_swap_colours_and_scale_the_stripe_period():
    by_name = {d.name: d for d in bench.decoys()}
    colour, (stripe, period) = targets.SUBJECT["color"], targets.SUBJECT["stripes"]
    swapped = next(d for d in by_name.values() if d.attribute == "base colour")
    assert swapped.overrides == {"color": stripe, "stripes": (colour, period)} and swapped.near
    widths = sorted(d.overrides["stripes"][1] / period for d in by_name.values() if d.attribute == "stripe width")
    assert widths == pytest.approx([0.5, 0.75, 1.5])
    backgrounds = {d.overrides["background"] for d in by_name.values() if d.role == bench.BACKGROUND}
    assert backgrounds == set(shapes.BACKGROUNDS) - {targets.SUBJECT["background"]}


def test_decoy_poses_come_from_another_stream_than_the_instance_images():
    import numpy as np

    instance = targets.subject_spec(np.random.default_rng((0, 1)))
    assert bench.decoy_specs(bench.decoys()[0], 1)[0] != instance
    assert bench.decoy_specs(bench.decoys()[0], 3, seed=5) != bench.decoy_specs(bench.decoys()[0], 3)


def _scores(subject: float, background: float, variant: float) -> dict[str, float]:
    out = {}
    for d in bench.decoys():
        out[d.name] = {bench.SUBJECT: subject, bench.BACKGROUND: background, bench.CEILING: subject}.get(
            d.role, variant
        )
    return out


def test_check_applies_the_gap_and_the_background_tolerance():
    rows = bench.decoys()
    good = bench.check(_scores(0.95, 0.92, 0.70), rows)
    assert all(ok in (True, None) for ok in good.values())
    assert good["subject"] is None
    bad = bench.check(_scores(0.95, 0.85, 0.85), rows)
    assert all(bad[d.name] is False for d in rows if d.role in (bench.BACKGROUND, bench.VARIANT))


def test_table_has_a_column_pair_per_network_and_states_the_criterion():
    rows = bench.decoys()
    results = {"net-a": _scores(0.95, 0.92, 0.70), "net-b": _scores(0.95, 0.92, 0.90)}
    csv_rows, lines = bench.table(rows, results, {d.name: 8 for d in rows})
    header = lines[0]
    for net in results:
        assert f"{net} identity" in header and f"{net} gap" in header
    text = "\n".join(lines)
    assert f"{bench.GAP:.2f}" in text and f"{bench.BACKGROUND_TOLERANCE:.2f}" in text
    assert "**net-a**: meets it." in text
    assert "**net-b**: fails it on" in text and "stripe width x0.5" in text
    assert len(csv_rows) == 2 * len(rows)
    assert {r["network"] for r in csv_rows} == set(results)
