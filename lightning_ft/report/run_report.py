"""The report of one run: ``report.html`` in the run folder, with every figure embedded, and the same figures as
PNG in ``report/``.

Top of the page: the verdict and the step it recommends, the final FID, what the run cost. Then the sections: the
corruption stage (fidelity with its class-prior and ceiling levels, the stage shaded), the sample grids over training
beside the instance images, the training loss, FID/KID, the cost with what each number measures, and the resolved
config. A section whose file the run did not write is left out and the page says which file and why.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path

from lightning_ft.report import figures, html
from lightning_ft.report.cost import describe, human_bytes, human_seconds, precision_name
from lightning_ft.report.evaluation import evaluation_card, evaluation_section
from lightning_ft.report.files import write_all
from lightning_ft.report.run_folder import RunFolder, finite, read_run
from lightning_ft.report.verdict import stage_of, stage_report

REPORT_HTML = "report.html"
FIGURE_DIR = "report"
FIGURE_NAMES = ("corruption_stage", "samples", "evaluation", "loss", "fid")
CHECKPOINT_STEP = re.compile(r"step=(\d+)")


@dataclass
class BuiltReport:
    """A report in memory: the page, its figures (name -> PNG) and any other file, written together by ``write``
    as ``<folder>/<html_name>`` and ``<folder>/<figure_dir>/<name>.png``."""

    html: str
    figures: dict[str, bytes] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    extra: dict[str, bytes | str] = field(default_factory=dict)  # file name in the folder -> content
    html_name: str = REPORT_HTML
    figure_dir: str = FIGURE_DIR
    known_figures: tuple[str, ...] = FIGURE_NAMES

    def files(self, folder: Path) -> dict[Path, bytes | str]:
        out: dict[Path, bytes | str] = {folder / self.figure_dir / f"{k}.png": png for k, png in self.figures.items()}
        out.update({folder / name: content for name, content in self.extra.items()})
        out[folder / self.html_name] = self.html  # the page last: it appears when everything it shows is there
        return out

    def write(self, folder: Path) -> Path:
        write_all(self.files(folder))
        for name in self.known_figures:  # a figure an earlier report had and this one has not would mislead
            stale = folder / self.figure_dir / f"{name}.png"
            if name not in self.figures and stale.exists():
                stale.unlink()
        return folder / self.html_name


def display_name(path: Path) -> str:
    """``dreambooth_bnn / version_0`` for ``runs/dreambooth_bnn/lightning_logs/version_0``; the folder's name else."""
    path = path.resolve()
    if path.parent.name == "lightning_logs":
        return f"{path.parent.parent.name} / {path.name}"
    return path.name


def base_model_name(pretrained) -> str | None:
    """The name to show for ``model.pretrained``: a hub id as it is, a local folder by its name."""
    if not pretrained:
        return None
    text = str(pretrained)
    local = text.startswith((".", "/", "~")) or Path(text).expanduser().exists() or text.count("/") != 1
    return Path(text).name if local else text


def checkpoint_for(run: RunFolder, step: int) -> str | None:
    """A checkpoint of the run that holds ``step``, relative to the run folder, if one was written."""
    monitor = run.callback_args("CorruptionStageMonitor") or {}
    best = run.path / "best_before_corruption.ckpt"
    if monitor.get("keep_best_checkpoint") and best.exists():
        return best.name
    for ckpt in sorted((run.path / "checkpoints").glob("*.ckpt")):
        match = CHECKPOINT_STEP.search(ckpt.name)
        if match and int(match.group(1)) == step:
            return f"checkpoints/{ckpt.name}"
    return None


def _fmt(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if finite(value) else "-"


# ------------------------------------------------------------------------------------------------- sections
def _corruption_section(run: RunFolder, report, figs: dict) -> str:
    if not run.corruption:
        why = run.notes.get("corruption") or "corruption_stage.csv holds no evaluation"
        return html.section("Corruption stage", html.note(why), "corruption")
    rules = run.callback_args("CorruptionStageMonitor") or {}
    noise = float(rules.get("noise_factor") or 1.5)
    figs["corruption_stage"] = figures.corruption_figure(run.corruption, noise, report.best_step_before_corruption)
    rows = {int(r["step"]): r for r in run.corruption}
    picks = [("start (pretrained)", min(rows)), ("recommended", report.best_step_before_corruption),
             ("final", max(rows))]  # fmt: skip
    table_rows = []
    for label, step in picks:
        if step is None or step not in rows:
            continue
        r = rows[step]
        table_rows.append([label, step, stage_of(r), _fmt(r.get("fidelity")), _fmt(r.get("progress"), 2),
                           _fmt(r.get("score"), 2), _fmt(r.get("memorisation")), _fmt(r.get("diversity"))])  # fmt: skip
    caption = (
        "Left: the monitor's subject fidelity (mean cosine similarity of its fixed-seed samples to the instance images)"
        " between two levels measured at the start of the fit: the <b>class prior</b> (what the pretrained model "
        "draws for the class prompt) and the <b>ceiling</b> (autoencoder round trips of the subject: no sample can "
        "beat it). Shaded: the points the stage rules label corruption (a fidelity dip with noisy samples) or "
        f"memorising. Middle: the corruption score, with the rules' noise threshold ({noise:g}). "
        f"{len(run.corruption)} evaluations."
    )
    body = html.figure(figs["corruption_stage"], "corruption stage curves", caption)
    body += "<p><b>Monitor:</b> " + html.esc(report.summary()) + "</p>"
    body += html.table(["point", "step", "stage", "fidelity", "progress", "corruption score", "memorisation",
                        "diversity"], table_rows, numeric={1, 3, 4, 5, 6, 7})  # fmt: skip
    return html.section("Corruption stage", body, "corruption")


def _samples_section(run: RunFolder, figs: dict, max_grids: int) -> str:
    if not run.samples:
        return html.section("Samples over training", html.note(run.notes["samples"]), "samples")
    shown = figures.pick_evenly(run.samples, max_grids)
    instances, why = run.instance_images()
    stage_at = {int(r["step"]): stage_of(r) for r in run.corruption or []}
    png = figures.samples_figure(shown, instances, run.sample_rows(), stage_at)
    figs["samples"] = png
    what = f"{len(shown)} of {len(run.samples)} grids (all in samples/)" if len(shown) < len(run.samples) else (
        f"{len(shown)} grid{'s' if len(shown) > 1 else ''}")  # fmt: skip
    seeds = (run.callback_args("SampleGridLogger") or {}).get("seeds")
    seeds = f" ({', '.join(map(str, seeds))})" if seeds else ""
    caption = (f"The SampleGridLogger's grids, {what}: one row per prompt, one column per seed{seeds}, the same seeds "
               "at every step; left, the instance images the run was fine-tuned on. A title in colour is a step the "
               "monitor labelled.")  # fmt: skip
    body = html.figure(png, "sample grids over training", caption)
    if why:
        body += html.note(f"Instance images not shown: {why}.")
    return html.section("Samples over training", body, "samples")


def _evaluation_section(run: RunFolder, figs: dict) -> str:
    """The DreamBench-style evaluation (``evaluation/``, written by ``python -m lightning_ft.evaluate``); nothing
    when the run has none."""
    if run.evaluation is None:
        return ""
    if run.evaluation_grid is not None:
        figs["evaluation"] = run.evaluation_grid.read_bytes()
    return evaluation_section(run.evaluation, figs.get("evaluation"))


def _loss_section(run: RunFolder, figs: dict) -> str:
    if run.metrics is None:
        return html.section("Training loss", html.note(run.notes["loss"]), "loss")
    png = figures.loss_figure(run)
    if png is None:
        every = ((run.config or {}).get("trainer") or {}).get("log_every_n_steps")
        why = "metrics.csv holds no train/loss" + (
            f": the run logs it every trainer.log_every_n_steps={every} steps and ended before" if every else ""
        )
        return html.section("Training loss", html.note(why), "loss")
    figs["loss"] = png
    caption = "train/loss as the logger recorded it (every trainer.log_every_n_steps steps), with its running mean."
    return html.section("Training loss", html.figure(png, "training loss", caption), "loss")


def _fid_section(run: RunFolder, figs: dict) -> str:
    png = figures.fid_figure(run) if run.metrics is not None else None
    if png is None:
        return html.section("FID / KID", html.note(run.notes.get("fid") or run.notes["loss"]), "fid")
    figs["fid"] = png
    samples, reference = figures.fid_counts(run)
    caption = (f"FIDMonitor: {figures._counts_text(samples)} samples scored against {figures._counts_text(reference)}"
               " reference images at each point.")  # fmt: skip
    return html.section("FID / KID over training", html.figure(png, "FID and KID", caption), "fid")


def _cost_section(run: RunFolder) -> str:
    if run.cost is None:
        return html.section("What the run cost", html.note(run.notes["cost"]), "cost")
    trainer = run.config.get("trainer") if run.config is not None else None  # None: no config.yaml to compare
    asked = precision_name(trainer.get("precision")) if isinstance(trainer, dict) else None
    rows = [[what, value, meaning] for what, value, meaning in describe(run.cost, asked)]
    body = html.table(["", "value", "what it measures"], rows, numeric={1})
    return html.section("What the run cost", body, "cost")


def _interrupted_note(run: RunFolder) -> str:
    """The mark of a fit stopped by a signal (run_cost.json, written by RunReport), first on the page."""
    cost = run.cost or {}
    if cost.get("status") != "interrupted":
        return ""
    resume = (f"{cost['checkpoint']} holds that step; --ckpt_path last resumes it" if cost.get("checkpoint")
              else "no checkpoint was written at that step")  # fmt: skip
    return html.note(f"Interrupted at step {cost.get('end_step', '?')} by {cost.get('signal') or 'a signal'}: the run "
                     f"did not finish (no final evaluation, no export); {resume}.")  # fmt: skip


def _config_section(run: RunFolder) -> str:
    if run.config_text is None:
        return html.section("Resolved config", html.note(run.notes["config"]), "config")
    body = (f"<details open><summary>config.yaml ({len(run.config_text.splitlines())} lines): the config the run "
            f"resolved, every default included</summary><pre>{html.esc(run.config_text)}</pre></details>")  # fmt: skip
    return html.section("Resolved config", body, "config")


# --------------------------------------------------------------------------------------------------- summary
def summarise(run: RunFolder) -> dict:
    """The numbers a comparison ranks and the page's cards show (None where not measured)."""
    out: dict = {"name": display_name(run.path), "method": run.method, "path": str(run.path)}
    report = stage_report(run.corruption) if run.corruption else None
    out["report"] = report
    out["verdict"] = report.verdict if report else None
    out["recommended_step"] = report.best_step_before_corruption if report else None
    rows = {int(r["step"]): r for r in run.corruption or []}
    at = rows.get(out["recommended_step"], {})
    out["fidelity"] = at.get("fidelity") if finite(at.get("fidelity")) else None
    out["progress"] = at.get("progress") if finite(at.get("progress")) else None
    last = rows[max(rows)] if rows else {}
    out["final_fidelity"] = last.get("fidelity") if finite(last.get("fidelity")) else None
    out["final_memorisation"] = last.get("memorisation") if finite(last.get("memorisation")) else None
    out["final_diversity"] = last.get("diversity") if finite(last.get("diversity")) else None
    out["fid"] = run.last("fid/fid") if run.metrics else None
    out["kid_x1000"] = run.last("fid/kid_x1000") if run.metrics else None
    out["fid_counts"] = figures.fid_counts(run) if run.metrics else (set(), set())
    out["final_loss"] = run.last("train/loss") if run.metrics else None
    cost = run.cost or {}
    out["steps"] = cost.get("end_step") or (max(rows) if rows else None)
    out["wall_seconds"], out["steps_per_second"] = cost.get("wall_seconds"), cost.get("steps_per_second")
    out["peak_memory_bytes"] = cost.get("peak_memory_bytes")
    return out


def _cards(run: RunFolder, s: dict) -> str:
    cards = []
    report = s["report"]
    if report is not None:
        detail = html.esc(report.summary().split("; verdict")[0])
        cards.append(html.card("verdict of the corruption monitor", report.verdict, detail, f"stage-{report.verdict}"))
        step = s["recommended_step"]
        if step is not None:
            ckpt = checkpoint_for(run, step)
            where = (f"checkpoint: <code>{html.esc(ckpt)}</code>" if ckpt else "no checkpoint was written at this step "
                     "(the monitor's <code>keep_best_checkpoint: true</code> keeps it)")  # fmt: skip
            if step == s["steps"] and (run.path / "export").is_dir():
                where = "the final weights: <code>export/</code>" + (f", <code>{html.esc(ckpt)}</code>" if ckpt else "")
            span = "before the corruption stage" if report.corruption_detected else "of the run"
            detail = (f"fidelity {_fmt(s['fidelity'])}, progress {_fmt(s['progress'], 2)}; the highest fidelity "
                      f"{span}<br>{where}")  # fmt: skip
            cards.append(html.card("recommended step", str(step), detail, "stage-adapting"))
    if run.evaluation is not None:
        cards.append(evaluation_card(run.evaluation))
    if s["fid"] is not None:
        samples, reference = s["fid_counts"]
        detail = (f"KID x 1000 {_fmt(s['kid_x1000'], 2)}; {figures._counts_text(samples)} samples vs "
                  f"{figures._counts_text(reference)} reference images")  # fmt: skip
        cards.append(html.card("final FID", _fmt(s["fid"], 2), detail))
    if run.cost:
        sps = s["steps_per_second"]
        detail = (f"{run.cost.get('steps')} steps at {sps:.2f} steps/s (all included); peak memory "
                  f"{human_bytes(s['peak_memory_bytes'])}" if sps else "")  # fmt: skip
        cards.append(html.card("wall time", human_seconds(s["wall_seconds"]), detail))
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def _subtitle(run: RunFolder, s: dict) -> str:
    model, data = run.section("model"), run.section("data")
    parts = [f"<b>{html.esc(s['method'])}</b>"]
    base = base_model_name(model.get("pretrained"))
    parts.append(f"on {html.esc(base)}" if base else "model built from component configs")
    if s["steps"] is not None:
        parts.append(f"{s['steps']} steps")
    instances, _ = run.instance_images()
    data_bits = []
    if instances:
        data_bits.append(f"{len(instances)} instance images")
    if data.get("num_class_images"):
        data_bits.append(f"{data['num_class_images']} class images")
    if data_bits:
        parts.append(" + ".join(data_bits))
    if data.get("instance_prompt"):
        parts.append(f"“{html.esc(data['instance_prompt'])}”")
    return " · ".join(parts) + f"<br><code>{html.esc(run.path)}</code>"


def build_run_report(run: RunFolder, max_grids: int = 4) -> BuiltReport:
    """The page and figures of ``run`` (nothing is written)."""
    s = summarise(run)
    figs: dict[str, bytes] = {}
    report = s["report"]
    sections = [
        _corruption_section(run, report, figs),
        _samples_section(run, figs, max_grids),
        _evaluation_section(run, figs),
        _loss_section(run, figs),
        _fid_section(run, figs),
        _cost_section(run),
        _config_section(run),
    ]
    missing = [text for key, text in run.notes.items() if key in ("corruption", "samples", "loss", "fid", "cost")]
    notes = _interrupted_note(run) + "".join(html.note(f"Not in this report: {text}.") for text in missing)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    footer = (f"Written by lightning-ft on {stamp}; <code>python -m lightning_ft.report {html.esc(run.path)}</code> "
              f"writes it again. The figures are also in <code>{FIGURE_DIR}/</code> as PNG.")  # fmt: skip
    body = _cards(run, s) + notes + "".join(sections)
    page = html.page(f"Run report: {s['name']}", _subtitle(run, s), body, footer)
    return BuiltReport(html=page, figures=figs, summary=s)


def write_run_report(path: str | Path, max_grids: int = 4) -> Path:
    """Read the run folder ``path``, build its report and write it there (atomically); returns the page's path."""
    run = read_run(path)
    return build_run_report(run, max_grids).write(run.path)
