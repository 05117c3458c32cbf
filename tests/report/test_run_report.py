"""The run report of a synthetic run folder: figures, stage shading, a self-contained page, the verdict, missing
files, errors naming the file, atomic writes."""

from __future__ import annotations

import base64
import io
import json
import math
import time
from html.parser import HTMLParser

import pytest
import yaml
from PIL import Image
from report_fixtures import DIP, PROMPTS, make_run

from lightning_ft.report import figures
from lightning_ft.report.cost import CostMeter, describe
from lightning_ft.report.run_folder import find_runs, read_run
from lightning_ft.report.run_report import build_run_report, write_run_report
from lightning_ft.report.stage_rules import classify_stages
from lightning_ft.report.verdict import stage_report


class Tags(HTMLParser):
    """Every tag's attributes, by tag name."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(page: str) -> list[tuple[str, dict]]:
    parser = Tags()
    parser.feed(page)
    return parser.tags


def test_stage_spans_hold_exactly_the_points_the_rules_label():
    steps = [0, 10, 20, 30, 40, 50, 60, 70]
    stages = ["adapting", "adapting", "corruption", "corruption", "unknown", "corruption", "adapting", "corruption"]
    spans = figures.stage_spans(steps, stages, "corruption")
    inside = lambda s: any(lo <= s <= hi for lo, hi in spans)  # noqa: E731
    # 20-50 is one run (the unknown point neither breaks nor extends it), 70 a lone point at the end.
    assert spans == [(15, 55), (65, 70)]
    assert all(inside(s) for s, st in zip(steps, stages) if st == "corruption")
    assert not any(inside(s) for s, st in zip(steps, stages) if st in ("adapting",))


def x_extent(patch) -> tuple[float, float]:
    """Data x-range of a shaded span (a Rectangle, or a Polygon in older matplotlib)."""
    if hasattr(patch, "get_width"):
        return patch.get_x(), patch.get_x() + patch.get_width()
    xs = [v[0] for v in patch.get_xy()]
    return min(xs), max(xs)


def test_corruption_figure_shades_the_rows_whose_stage_code_fires(tmp_path):
    run = read_run(make_run(tmp_path))
    figure = figures.draw_corruption(run.corruption, 1.5, recommended=20)
    try:
        for axis in figure.axes[:3]:
            shaded = [p for p in axis.patches if p.get_gid() == "stage-corruption"]
            assert len(shaded) == 1, "one corruption run, steps 30-40"
            x0, x1 = x_extent(shaded[0])
            flagged = [r["step"] for r in run.corruption if r["stage_code"] == 1]
            others = [r["step"] for r in run.corruption if r["stage_code"] != 1]
            assert all(x0 <= s <= x1 for s in flagged) and not any(x0 <= s <= x1 for s in others)
            memorising = [p for p in axis.patches if p.get_gid() == "stage-memorising"]
            assert len(memorising) == 1 and x_extent(memorising[0]) == (55, 60)
        texts = " ".join(t.get_text() for t in figure.axes[0].texts)
        assert "class prior 0.300" in texts and "ceiling 0.900" in texts
        assert "noise threshold 1.5" in " ".join(t.get_text() for t in figure.axes[1].texts)
    finally:
        figures.pyplot().close(figure)


def test_verdict_read_back_from_the_csv_is_the_monitors(tmp_path):
    steps, fid, score, _ = zip(*DIP)
    memorisation = [f + 0.05 for f in fid]
    monitor = classify_stages(steps, fid, score, memorisation, memorisation_threshold=0.84, levels=(0.3, 0.9))
    assert monitor.stages == [s for *_, s in DIP], "the fixture holds the rules' own labels"
    read = stage_report(read_run(make_run(tmp_path)).corruption)
    assert read.summary() == monitor.summary()
    assert read.best_step_before_corruption == 20 and read.corruption_start == 30 and read.verdict == "memorising"


def test_page_embeds_every_figure_and_references_no_other_file(tmp_path):
    folder = make_run(tmp_path, fid=[80.0, 60.0, 55.0])
    page = write_run_report(folder)
    html = page.read_text()
    tags = parse(html)
    images = [a["src"] for t, a in tags if t == "img"]
    written = sorted((folder / "report").glob("*.png"))
    assert {p.stem for p in written} == {"corruption_stage", "samples", "loss", "fid"}
    assert len(images) == len(written)
    embedded = sorted(base64.b64decode(src.split(",", 1)[1]) for src in images)
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert embedded == sorted(p.read_bytes() for p in written), "the page shows the PNGs written beside it"
    for tag, attrs in tags:  # nothing is loaded from elsewhere: no stylesheet, script, frame or image by address
        assert tag not in ("link", "iframe", "object", "embed"), (tag, attrs)
        assert attrs.get("src", "data:").startswith("data:"), (tag, attrs)
        assert attrs.get("href", "#").startswith("#"), (tag, attrs)
    assert "url(" not in html and "@import" not in html
    for text in ("Corruption stage", "corruption stage: steps 30-40", "verdict memorising", "recommended step",
                 "FID / KID over training", "16 samples", "What the run cost", "12.5 s", "3.0 GiB",
                 "Resolved config", "lr: 0.0001"):  # fmt: skip
        assert text in html, text


def test_samples_figure_holds_the_instance_images_and_every_grid_up_to_the_limit(tmp_path):
    folder = make_run(tmp_path, samples=(10, 20, 30, 40, 50, 60))
    run = read_run(folder)
    assert [s for s, _ in figures.pick_evenly(run.samples, 4)] == [10, 30, 40, 60]
    built = build_run_report(run, max_grids=4)
    image = Image.open(io.BytesIO(built.figures["samples"]))
    grid = Image.open(run.samples[0][1])
    assert image.width > 5 * grid.width, "instance block + 4 grids side by side"
    assert "4 of 6 grids" in built.html


def test_a_run_without_corruption_csv_or_cost_gets_a_report_that_says_what_is_missing(tmp_path):
    folder = make_run(tmp_path, corruption=False, cost=False)
    page = write_run_report(folder)
    html = page.read_text()
    assert "no corruption_stage.csv in this folder" in html and "CorruptionStageMonitor" in html
    assert "no run_cost.json in this folder" in html
    assert not (folder / "report" / "corruption_stage.png").exists()
    assert (folder / "report" / "loss.png").exists() and (folder / "report" / "samples.png").exists()


def test_loss_figure_leaves_out_a_term_of_another_scale_and_says_so(tmp_path):
    run = read_run(make_run(tmp_path))
    total, drawn, skipped = figures.loss_terms(run)
    assert total == "train/loss" and drawn == [] and skipped == ["train/loss/kl"]


def test_grid_rows_come_from_rows_json_else_from_the_grid_or_the_data_in_the_config(tmp_path):
    folder = make_run(tmp_path)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert read_run(folder).sample_rows() == PROMPTS  # a run of before rows.json, whose grid named its prompts
    config["trainer"]["callbacks"][0]["init_args"] = {"seeds": [0, 1]}  # a recipe's grid: the data's rows
    config["data"]["init_args"] |= {"sample_prompts": ["a sks star on navy"], "sample_labels": [3, 7]}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    assert read_run(folder).sample_rows() == ["a sks star on navy"]
    del config["data"]["init_args"]["sample_prompts"]
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    assert read_run(folder).sample_rows() == ["class 3", "class 7"]
    # What the grid wrote beside its images wins: the rows it drew (here a class-conditional model's).
    (folder / "samples" / "rows.json").write_text(json.dumps({"rows": ["class 0", "class 9"], "seeds": [0, 1]}))
    assert read_run(folder).sample_rows() == ["class 0", "class 9"]
    (folder / "samples" / "rows.json").write_text(json.dumps({"rows": [""], "seeds": [0, 1]}))
    assert read_run(folder).sample_rows() is None  # one row asked with nothing (ANL): no label
    (folder / "samples" / "rows.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"rows.json: not the grid's rows"):
        read_run(folder)


def test_errors_name_the_file_at_fault(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no metrics.csv.*not a run folder"):
        read_run(empty)
    folder = make_run(tmp_path)
    (folder / "metrics.csv").write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(ValueError, match=r"metrics.csv: no column step"):
        read_run(folder)
    (folder / "metrics.csv").write_text("step\n1\n")
    (folder / "config.yaml").write_text("trainer: [unclosed\n")
    with pytest.raises(ValueError, match=r"config.yaml: not valid YAML"):
        read_run(folder)
    with pytest.raises(FileNotFoundError, match="no run folder under it"):
        find_runs(empty)


def test_a_failed_render_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    folder = make_run(tmp_path)
    page = write_run_report(folder)
    before = {p: p.read_bytes() for p in [page, *(folder / "report").glob("*.png")]}

    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figures, "loss_figure", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        write_run_report(folder)
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in folder.rglob("*.tmp")]


def test_find_runs_takes_every_run_under_a_folder(tmp_path):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    (a / "export").mkdir()
    (a / "export" / "config.yaml").write_text("{}")  # an export's own files are not runs
    assert find_runs(tmp_path) == [a, b] and find_runs(a) == [a]


def test_cost_meter_measures_steps_time_and_memory_and_says_what_they_are():
    meter = CostMeter()
    meter.start(5)
    time.sleep(0.05)
    record = meter.stop(25)
    assert record["steps"] == 20 and record["start_step"] == 5 and record["wall_seconds"] >= 0
    assert record["peak_memory_kind"] == "process_peak_rss" and record["peak_memory_bytes"] > 10 * 2**20
    rows = {what: (value, meaning) for what, value, meaning in describe(record)}
    assert "from step 5" in rows["optimizer steps"][1] and "whole process" in rows["peak memory"][1]
    assert "not the training step alone" in rows["steps/s"][1]
    assert record["wall_seconds"] >= 0.05 and math.isclose(record["steps_per_second"], 20 / record["wall_seconds"],
                                                           rel_tol=0.05)  # fmt: skip
