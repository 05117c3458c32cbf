"""A comparison of several runs (a sweep, a benchmark's seeds, two methods): their curves overlaid, their final
sample grids side by side and a table ranked by what their monitors measured.

The ranking column, unless one is asked for (``rank=``):

- every run has FID: the final FID, lowest first (FID scores the samples against a reference set of the target;
  it is biased by the sample count, so the table shows the counts and the page warns when they differ);
- else every run has the corruption-stage monitor: the progress at the step the monitor recommends (its best
  fidelity before any corruption stage, i.e. the checkpoint one would keep), highest first; progress places the
  fidelity between the class prior (0) and the ceiling (1), so runs measured against other levels compare. Where a
  run has no levels, the fidelity at that step is used for every run instead;
- else the runs are listed in the order given, and the page says why.

Runs without the ranking value go last.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from lightning_ft.report import figures, html
from lightning_ft.report.cost import human_bytes, human_seconds
from lightning_ft.report.run_folder import RunFolder, finite, read_run
from lightning_ft.report.run_report import REPORT_HTML, BuiltReport, display_name, summarise
from lightning_ft.report.verdict import stage_of

#: Ranking columns: summary key -> (title, lower is better).
RANKINGS = {
    "fid": ("final FID", True),
    "kid_x1000": ("final KID x 1000", True),
    "progress": ("progress at the recommended step", False),
    "fidelity": ("fidelity at the recommended step", False),
    "final_fidelity": ("final fidelity", False),
    "final_loss": ("final train/loss", True),
}
COMPARISON_HTML = "comparison.html"
COMPARISON_FIGURES = ("curves", "grids")


def run_labels(paths: list[Path]) -> list[str]:
    """Short distinct names: each run's path below the runs' common folder, without ``lightning_logs`` and without
    the trailing parts every run shares (``version_0``); one run is named by ``display_name``."""
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        return [display_name(resolved[0])]
    common = Path(os.path.commonpath(resolved))
    parts = [[x for x in p.relative_to(common).parts if x != "lightning_logs"] or [p.name] for p in resolved]
    while all(len(x) > 1 for x in parts) and len({x[-1] for x in parts}) == 1:
        parts = [x[:-1] for x in parts]
    labels = ["/".join(x) for x in parts]
    return [f"{label} ({i})" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def differing_settings(runs: list[RunFolder], limit: int = 5) -> list[str]:
    """Per run, the model, data and trainer settings whose values differ between the runs (``lr=0.001``), so that a
    sweep's rows say what was swept."""
    flats = []
    for run in runs:
        config = run.config or {}
        flat = {f"model.{k}": v for k, v in _flat(run.section("model")).items()}
        flat.update({f"data.{k}": v for k, v in _flat(run.section("data")).items()})
        flat.update({f"trainer.{k}": v for k, v in (config.get("trainer") or {}).items()
                     if k in ("max_steps", "precision", "accumulate_grad_batches")})  # fmt: skip
        flat["seed"] = config.get("seed_everything")
        flats.append(flat)
    keys = sorted(set.intersection(*(set(f) for f in flats)))  # a key of one method only: the method column says it
    differ = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1 and not k.startswith("model.components")]
    differ = [k for k in differ if not k.endswith(("_dir", "_path", "save_dir"))] or differ
    short = lambda k: k.split(".", 1)[-1] if k != "seed" else k  # noqa: E731
    return [", ".join(f"{short(k)}={f.get(k)}" for k in differ[:limit]) + (" ..." if len(differ) > limit else "")
            for f in flats]  # fmt: skip


def choose_ranking(summaries: list[dict], requested: str | None = None) -> tuple[str | None, str]:
    """(summary key to rank by, the reason in words); key None = no ranking."""
    if requested:
        if requested not in RANKINGS:
            raise ValueError(f"rank={requested!r}: choose one of {', '.join(RANKINGS)}")
        title, lower = RANKINGS[requested]
        return requested, f"ranked by {title} ({'lower' if lower else 'higher'} first), as asked"
    reasons = {
        "fid": "the final FID, lowest first: FID scores the samples against the reference set of the target",
        "progress": "the progress (fidelity between the class prior, 0, and the ceiling, 1) at the step the "
        "corruption monitor recommends, highest first: that step is the run's best fidelity before any corruption "
        "stage, the checkpoint one would keep",
        "fidelity": "the fidelity at the step the corruption monitor recommends, highest first: that step is the "
        "run's best fidelity before any corruption stage, the checkpoint one would keep (not every run measured "
        "the levels that progress needs)",
    }
    counts = {key: sum(1 for s in summaries if s.get(key) is not None) for key in reasons}
    full = [key for key in reasons if summaries and counts[key] == len(summaries)]
    key = full[0] if full else max(reasons, key=lambda k: counts[k]) if any(counts.values()) else None
    if key is None:
        return None, "not ranked: the runs share no monitor (FIDMonitor or CorruptionStageMonitor) to rank them by"
    lacking = len(summaries) - counts[key]
    return key, f"ranked by {reasons[key]}" + (f"; {lacking} run(s) without it come last" if lacking else "")


def rank(summaries: list[dict], key: str | None) -> list[dict]:
    """``summaries`` best first by ``key`` (stable; runs without a value last); unchanged when ``key`` is None."""
    if key is None:
        return list(summaries)
    lower = RANKINGS[key][1]
    have = [s for s in summaries if s.get(key) is not None and not math.isnan(s[key])]
    missing = [s for s in summaries if s not in have]
    return sorted(have, key=lambda s: s[key] if lower else -s[key]) + missing


# ---------------------------------------------------------------------------------------------------- figures
def _same(values: list) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and len(present) == len(values) and all(abs(v - present[0]) < 1e-9 for v in present)


def curves_figure(runs: list[RunFolder], labels: list[str]) -> bytes:
    """Fidelity, corruption score, training loss (running mean) and FID of every run on shared axes."""
    plt = figures.pyplot()
    from matplotlib.lines import Line2D

    figure, axes = plt.subplots(2, 2, figsize=(15, 8.4), layout="constrained")
    (fid_ax, score_ax), (loss_ax, fid_curve_ax) = axes
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    handles = []
    levels = {"class_prior": [], "ceiling": []}
    for k, (run, label) in enumerate(zip(runs, labels)):
        colour = colours(k % colours.N)
        handles.append(Line2D([], [], color=colour, linewidth=2, label=label))
        rows = run.corruption or []
        if rows:
            steps = [int(r["step"]) for r in rows]
            fid_ax.plot(steps, [r.get("fidelity") for r in rows], "o-", color=colour, markersize=3, linewidth=1.8)
            score_ax.plot(steps, [r.get("score") for r in rows], "o-", color=colour, markersize=3, linewidth=1.8)
            bad = [(s, r.get("fidelity")) for s, r in zip(steps, rows) if stage_of(r) == "corruption"]
            if bad:
                fid_ax.plot(*zip(*bad), "x", color="#d62728", markersize=9, markeredgewidth=2.2, zorder=5)
            for key in levels:
                levels[key].append(rows[-1].get(key) if finite(rows[-1].get(key)) else None)
        if run.metrics:
            total, _, _ = figures.loss_terms(run)
            if total:
                s, v = run.series(total)
                loss_ax.plot(s, figures.running_mean(v, max(3, len(v) // 15)), "-", color=colour, linewidth=1.8)
            s, v = run.series("fid/fid")
            if v:
                fid_curve_ax.plot(s, v, "o-", color=colour, markersize=3, linewidth=1.8)
    for key, colour in (("class_prior", "0.35"), ("ceiling", "black")):
        if _same(levels[key]):  # one level for every run: draw it; runs with other levels are read by progress
            figures._label_line(fid_ax, levels[key][0], f"{key.replace('_', ' ')} {levels[key][0]:.3f}", colour,
                                "bottom" if key == "class_prior" else "top")  # fmt: skip
    fid_ax.set_title("Subject fidelity (x = a point the rules label corruption)", fontsize=11)
    score_ax.set_title("Corruption score (samples' / instance images' high-frequency energy)", fontsize=11)
    loss_ax.set_title("Training loss (running mean)", fontsize=11)
    fid_curve_ax.set_title("FID", fontsize=11)
    for axis in axes.flat:
        axis.set_xlabel("step")
        axis.grid(alpha=0.25)
        if not axis.lines:
            axis.text(0.5, 0.5, "not measured by any of these runs", transform=axis.transAxes, ha="center",
                      va="center", color="0.4")  # fmt: skip
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=10, frameon=False)
    return figures.png_bytes(figure)


def grids_figure(runs: list[RunFolder], labels: list[str], summaries: list[dict]) -> bytes | None:
    """Each run's last sample grid, side by side, titled with the run and the step."""
    from PIL import Image

    panels = []
    for run, label, s in zip(runs, labels, summaries):
        if run.samples:
            step, path = run.samples[-1]
            colour = figures.STAGE_COLOURS.get(s.get("verdict"), "black")
            panels.append((f"{label} · step {step}", Image.open(path), colour))
    if not panels:
        return None
    prompts = [run.sample_rows() for run in runs if run.samples]
    rows = prompts[0] if prompts and all(p == prompts[0] for p in prompts) else None
    return figures.image_png(figures.labelled_panels(panels, rows, max_height=400))


# ---------------------------------------------------------------------------------------------------- the page
def _num(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if value is not None and not math.isnan(value) else "-"


TABLE_HEADER = ["rank", "run", "method", "settings that differ", "steps", "verdict", "recommended step",
                "fidelity", "progress", "memorisation (final)", "diversity (final)", "FID (final)", "KID x 1000",
                "FID samples / reference", "wall time", "steps/s", "peak memory"]  # fmt: skip


def table_row(position: int | None, s: dict) -> list:
    samples, reference = s["fid_counts"]
    counts = (f"{figures._counts_text(samples)} / {figures._counts_text(reference)}" if s["fid"] is not None
              else "-")  # fmt: skip
    return [position if position is not None else "-", s["label"], s["method"], s["differs"] or "-", s["steps"] or "-",
            s["verdict"] or "-", s["recommended_step"] if s["recommended_step"] is not None else "-",
            _num(s["fidelity"]), _num(s["progress"], 2), _num(s["final_memorisation"]), _num(s["final_diversity"]),
            _num(s["fid"], 2), _num(s["kid_x1000"], 2), counts, human_seconds(s["wall_seconds"]),
            _num(s["steps_per_second"], 2), human_bytes(s["peak_memory_bytes"])]  # fmt: skip


def _csv(rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(TABLE_HEADER)
    writer.writerows(rows)
    return buffer.getvalue()


def build_comparison(runs: list[RunFolder], out: Path, rank_by: str | None = None) -> BuiltReport:
    labels = run_labels([r.path for r in runs])
    summaries = []
    for run, label, differs in zip(runs, labels, differing_settings(runs)):
        s = summarise(run)
        s["label"], s["run"], s["differs"] = label, run, differs
        summaries.append(s)
    key, why = choose_ranking(summaries, rank_by)
    ordered = rank(summaries, key)
    ranked_count = sum(1 for s in ordered if key is not None and s.get(key) is not None)
    rows = [table_row(i + 1 if i < ranked_count else None, s) for i, s in enumerate(ordered)]
    figs = {"curves": curves_figure(runs, labels)}
    grids = grids_figure(runs, labels, summaries)
    if grids is not None:
        figs["grids"] = grids
    body = f"<p><b>{html.esc(why[0].upper() + why[1:])}.</b></p>"
    counts = {(tuple(sorted(s["fid_counts"][0])), tuple(sorted(s["fid_counts"][1]))) for s in summaries
              if s["fid"] is not None}  # fmt: skip
    if len(counts) > 1:
        body += html.note("The runs' FIDs were measured with different sample or reference counts: FID is biased "
                          "by both, so their FIDs do not compare directly.")  # fmt: skip
    shown = [i for i in range(len(TABLE_HEADER)) if i < 3 or any(row[i] != "-" for row in rows)]  # no empty column
    numeric = {k for k, i in enumerate(shown) if i in (0, 4, 6, 7, 8, 9, 10, 11, 12, 14, 15)}
    body += '<div style="overflow-x:auto">' + html.table([TABLE_HEADER[i] for i in shown],
                                                          [[row[i] for i in shown] for row in rows],
                                                          numeric=numeric, first_class="first") + "</div>"  # fmt: skip
    pages = {s["label"]: Path(s["path"]) / REPORT_HTML for s in ordered}
    linked = [f'<a href="{html.esc(os.path.relpath(page, out))}">{html.esc(label)}</a>'
              for label, page in pages.items() if page.exists()]  # fmt: skip
    if linked:
        body += "<p>Each run's own report: " + ", ".join(linked) + ".</p>"
    if len(linked) < len(pages):
        without = ", ".join(html.esc(label) for label, page in pages.items() if not page.exists())
        body += (
            f"<p>Runs without a report.html yet (<code>python -m lightning_ft.report RUN_DIR</code>): {without}.</p>"
        )
    sections = [html.section("Ranking", body, "ranking")]
    sections.append(html.section("Curves", html.figure(figs["curves"], "curves of every run",
                                 "Each run's monitor curves and loss on shared axes; the level lines are drawn when "
                                 "every run measured the same levels."), "curves"))  # fmt: skip
    if grids is not None:
        sections.append(html.section("Final samples", html.figure(grids, "final sample grids",
                                     "Each run's last sample grid (same prompts and seeds when the runs share their "
                                     "sample-grid settings); a title in colour is a run whose verdict is not "
                                     "adapting."), "grids"))  # fmt: skip
    lacking: dict[str, list[str]] = {}
    for s in summaries:
        for part, text in s["run"].notes.items():
            if part in ("corruption", "fid", "cost", "samples"):
                lacking.setdefault(text, []).append(s["label"])
    if lacking:
        notes = "".join(html.note(f"{text}: {', '.join(labels)}") for text, labels in lacking.items())
        sections.append(html.section("What some runs lack", notes, "notes"))
    footer = ("Written by lightning-ft; <code>python -m lightning_ft.report --compare RUN_DIR ...</code> writes it "
              "again. Figures in <code>figures/</code>, the table in <code>comparison.csv</code>.")  # fmt: skip
    subtitle = html.esc(", ".join(dict.fromkeys(s["method"] for s in summaries)))
    page = html.page(f"Comparison of {len(runs)} runs", subtitle, "".join(sections), footer)
    for s in summaries:
        s.pop("run")
    return BuiltReport(html=page, figures=figs, summary={"ranking": key, "why": why, "order": ordered},
                       extra={"comparison.csv": _csv(rows)}, html_name=COMPARISON_HTML, figure_dir="figures",
                       known_figures=COMPARISON_FIGURES)  # fmt: skip


def default_out(paths: list[Path]) -> Path:
    """``<the runs' common folder>/comparison``."""
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    return common / "comparison"


def write_comparison(paths: list[str | Path], out: str | Path | None = None, rank_by: str | None = None) -> Path:
    """Read every run folder of ``paths``, write ``<out>/comparison.html`` (figures embedded), ``figures/*.png`` and
    ``comparison.csv``; ``out`` defaults to ``comparison/`` in the runs' common folder. Returns the page's path."""
    runs = [read_run(p) for p in paths]
    if not runs:
        raise ValueError("write_comparison: no run folder given")
    out = Path(out) if out else default_out([r.path for r in runs])
    return build_comparison(runs, out, rank_by).write(out)
