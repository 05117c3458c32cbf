"""The corruption-stage verdict of a finished run, read back from its ``corruption_stage.csv``.

The monitor rewrites the CSV at every evaluation with the stage of every point as classified on the whole history
(``stage`` column), so the file's last version carries the final classification. The summary is rebuilt from those
labels by the same definitions as ``classify_stages`` (verdict = the label of the last finite point; the stage = the
first run of ``corruption`` points; the recommended step = the highest fidelity before it, earliest on ties) and
printed with ``StageReport.summary``: the line the monitor printed at the end of the fit.
"""

from __future__ import annotations

import math

from lightning_ft.report.run_folder import finite
from lightning_ft.report.stage_rules import STAGE_CODES, StageReport

CODE_STAGES = {code: stage for stage, code in STAGE_CODES.items()}


def stage_of(row: dict) -> str:
    """A row's stage label: the ``stage`` column, else the name of its ``stage_code``, else unknown."""
    stage = row.get("stage")
    if isinstance(stage, str) and stage in STAGE_CODES:
        return stage
    code = row.get("stage_code")
    return CODE_STAGES.get(int(code), "unknown") if finite(code) else "unknown"


def stage_runs(steps: list[int], stages: list[str], stage: str) -> list[tuple[int, int]]:
    """(first, last) step of every run of consecutive points labelled ``stage`` (unknown points neither break nor
    extend a run, as in ``classify_stages``)."""
    runs: list[list[int]] = []
    previous = None
    for step, label in zip(steps, stages):
        if label == "unknown":
            continue
        if label == stage:
            if previous == stage:
                runs[-1].append(step)
            else:
                runs.append([step])
        previous = label
    return [(r[0], r[-1]) for r in runs]


def stage_report(rows: list[dict]) -> StageReport:
    """The ``StageReport`` of the monitor's CSV rows (sorted by step here)."""
    rows = sorted(rows, key=lambda r: r["step"])
    steps = [int(r["step"]) for r in rows]
    fidelity = [float(r["fidelity"]) if finite(r.get("fidelity")) else math.nan for r in rows]
    stages = [stage_of(r) if not math.isnan(f) else "unknown" for r, f in zip(rows, fidelity)]
    finite_points = [i for i, f in enumerate(fidelity) if not math.isnan(f)]
    drops, running = [math.nan] * len(rows), -math.inf
    for i in finite_points:
        running = max(running, fidelity[i])
        drops[i] = running - fidelity[i]
    intervals = stage_runs(steps, stages, "corruption")
    report = StageReport(
        steps=steps,
        stages=stages,
        drops=drops,
        thresholds=[math.nan] * len(rows),
        verdict=stages[finite_points[-1]] if finite_points else "unknown",
        intervals=intervals,
        dip_depth=max((drops[i] for i in finite_points), default=0.0),
    )
    if intervals:
        report.corruption_detected = True
        report.corruption_start, report.corruption_end = intervals[0]
        report.corruption_ongoing = intervals[0][1] == steps[finite_points[-1]]
    before = [i for i in finite_points if not intervals or steps[i] < intervals[0][0]]
    if before:
        best = max(before, key=lambda i: (fidelity[i], -i))
        report.best_step_before_corruption, report.best_fidelity = steps[best], fidelity[best]
    return report
