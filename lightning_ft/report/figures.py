"""The figures of a run report, drawn with matplotlib (curves) and PIL (sample grids), each returned as PNG bytes.

- ``loss_figure``: the training loss per logged step with its running mean, the loss terms of the same scale and
  the validation loss;
- ``corruption_figure``: the monitor's fidelity with the class-prior and ceiling levels, the corruption score with
  the rules' noise threshold, the samples' diversity; the points the rules label ``corruption`` (and
  ``memorising``) shaded, the recommended step marked;
- ``fid_figure``: FID and KID over training, titled with the sample and reference counts;
- ``samples_figure``: the instance images beside the sample grids over training, one column per grid.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lightning_ft.images import load_image
from lightning_ft.report.run_folder import RunFolder, finite
from lightning_ft.report.verdict import stage_of

STAGE_COLOURS = {"corruption": "#d62728", "memorising": "#9467bd"}
STAGE_TEXT = {"corruption": "corruption stage (the rules fire)", "memorising": "memorising"}
DPI = 100


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    finally:
        pyplot().close(figure)
    return buffer.getvalue()


def image_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------- stage
def stage_spans(steps: list[int], stages: list[str], stage: str) -> list[tuple[float, float]]:
    """The x-intervals to shade for the runs of consecutive points labelled ``stage``: each run from halfway to the
    point before it to halfway to the point after it (the curve's ends close a run), so a span holds exactly the
    points the rules labelled and a single point is still visible. Unknown points are skipped."""
    points = sorted((s, label) for s, label in zip(steps, stages) if label != "unknown")
    spans = []
    i = 0
    while i < len(points):
        if points[i][1] != stage:
            i += 1
            continue
        j = i
        while j + 1 < len(points) and points[j + 1][1] == stage:
            j += 1
        lo = (points[i - 1][0] + points[i][0]) / 2 if i > 0 else points[i][0]
        hi = (points[j][0] + points[j + 1][0]) / 2 if j + 1 < len(points) else points[j][0]
        if hi - lo < 1e-9:  # a lone point at an end, or the only point: give it a visible width
            gaps = [b[0] - a[0] for a, b in zip(points, points[1:])] or [2.0]
            half = min(gaps) / 4
            lo, hi = lo - (half if i == 0 else 0), hi + (half if j + 1 == len(points) else 0)
        spans.append((lo, hi))
        i = j + 1
    return spans


def shade_stages(axis, steps: list[int], stages: list[str]) -> list:
    """Shade the corruption and memorising runs on ``axis``; returns legend handles of what was shaded."""
    from matplotlib.patches import Patch

    handles = []
    for stage, colour in STAGE_COLOURS.items():
        spans = stage_spans(steps, stages, stage)
        for lo, hi in spans:
            axis.axvspan(lo, hi, color=colour, alpha=0.14, linewidth=0, zorder=0, gid=f"stage-{stage}")
        if spans:
            handles.append(Patch(color=colour, alpha=0.3, label=STAGE_TEXT[stage]))
    return handles


def _column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) if finite(r.get(key)) else math.nan for r in rows]


def _level(rows: list[dict], key: str) -> float | None:
    values = [v for v in _column(rows, key) if not math.isnan(v)]
    return values[-1] if values else None


def _label_line(axis, y: float, text: str, colour: str, va: str) -> None:
    axis.axhline(y, color=colour, linestyle="--", linewidth=1.2, zorder=1)
    axis.text(0.01, y, f" {text}", transform=axis.get_yaxis_transform(), va=va, ha="left", fontsize=9,
              color=colour, bbox=dict(facecolor="white", edgecolor="none", alpha=0.75, pad=1))  # fmt: skip


def corruption_figure(rows: list[dict], noise_factor: float = 1.5, recommended: int | None = None) -> bytes:
    """Fidelity with its levels, corruption score with the noise threshold, diversity; stages shaded (PNG)."""
    return png_bytes(draw_corruption(rows, noise_factor, recommended))


def draw_corruption(rows: list[dict], noise_factor: float = 1.5, recommended: int | None = None):
    """The matplotlib figure of ``corruption_figure`` (the caller closes it)."""
    plt = pyplot()
    steps = [int(r["step"]) for r in rows]
    stages = [stage_of(r) for r in rows]
    fidelity, score = _column(rows, "fidelity"), _column(rows, "score")
    memorisation, diversity = _column(rows, "memorisation"), _column(rows, "diversity")
    prior, ceiling = _level(rows, "class_prior"), _level(rows, "ceiling")
    figure, (left, middle, right) = plt.subplots(
        1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.5, 1, 1]}, layout="constrained"
    )
    figure.get_layout_engine().set(wspace=0.06)

    handles = shade_stages(left, steps, stages)
    left.plot(steps, fidelity, "o-", color="C0", linewidth=2, markersize=4, label="fidelity (mean similarity)")
    if any(not math.isnan(v) for v in memorisation):
        left.plot(steps, memorisation, "--", color="0.45", linewidth=1, label="memorisation (nearest instance)")
    if prior is not None:
        _label_line(left, prior, f"class prior {prior:.3f}", "0.35", "bottom")
    if ceiling is not None:
        _label_line(left, ceiling, f"ceiling {ceiling:.3f}", "black", "top")
    if recommended is not None and recommended in steps:
        y = fidelity[steps.index(recommended)]
        left.plot([recommended], [y], marker="*", markersize=16, color="#2ca02c", markeredgecolor="black",
                  linestyle="none", zorder=5, label=f"recommended step {recommended}")  # fmt: skip
    if prior is not None and ceiling is not None and ceiling > prior:
        span = ceiling - prior
        secondary = left.secondary_yaxis("right", functions=(lambda f: (f - prior) / span, lambda p: prior + p * span))
        secondary.set_ylabel("progress (0 = class prior, 1 = ceiling)", fontsize=9)
    top = max([v for v in (*fidelity, *memorisation, ceiling or 0) if not math.isnan(v)], default=1.0)
    left.set_ylim(min(0.0, min((v for v in fidelity if not math.isnan(v)), default=0.0)), max(1.0, top + 0.05))
    left.set_title("Subject fidelity\n(samples vs instance images)", fontsize=11)
    left.set_ylabel("cosine similarity")
    left.legend(handles=left.get_legend_handles_labels()[0] + handles, fontsize=8, loc="lower right")

    shade_stages(middle, steps, stages)
    middle.plot(steps, score, "o-", color="C1", linewidth=2, markersize=4)
    _label_line(middle, noise_factor, f"noise threshold {noise_factor:g}", "black", "bottom")
    finite_scores = [v for v in score if not math.isnan(v)]
    middle.set_ylim(0, max([noise_factor * 1.25, *finite_scores]) * 1.05)
    middle.set_title("Corruption score\n(high-frequency energy, samples / instance images)", fontsize=11)

    shade_stages(right, steps, stages)
    right.plot(steps, diversity, "o-", color="C2", linewidth=2, markersize=4)
    right.set_title("Diversity of the samples\n(mean pairwise feature distance)", fontsize=11)
    right.set_ylim(bottom=0)
    for axis in (left, middle, right):
        axis.set_xlabel("step")
        axis.grid(alpha=0.25)
        axis.set_xlim(min(steps) - 0.02 * (max(steps) - min(steps) + 1), max(steps) * 1.02 + 1)
    return figure


# ----------------------------------------------------------------------------------------------------- loss
def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_terms(run: RunFolder) -> tuple[str | None, list[str], list[str]]:
    """(total loss column, term columns drawn beside it, term columns left out for being of another scale)."""
    columns = run.columns()
    total = "train/loss" if "train/loss" in columns else next((c for c in columns if c.startswith("train/loss")), None)
    if total is None:
        return None, [], []
    _, values = run.series(total)
    scale = max((abs(v) for v in values), default=0.0)
    drawn, skipped = [], []
    for column in columns:
        if column.startswith(f"{total}/"):
            _, term = run.series(column)
            (drawn if term and max(abs(v) for v in term) <= 10 * max(scale, 1e-12) else skipped).append(column)
    return total, drawn, skipped


def loss_figure(run: RunFolder) -> bytes | None:
    total, terms, skipped = loss_terms(run)
    if total is None:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(15, 3.8), layout="constrained")
    steps, values = run.series(total)
    window = max(3, len(values) // 15)
    axis.plot(steps, values, ".", color="C0", alpha=0.35, markersize=4, label=f"{total} (each logged step)")
    axis.plot(steps, running_mean(values, window), "-", color="C0", linewidth=2.2,
              label=f"{total}, mean of the last {window} logged")  # fmt: skip
    for k, column in enumerate(terms):
        s, v = run.series(column)
        axis.plot(s, running_mean(v, window), "-", color=f"C{k + 1}", linewidth=1.2, alpha=0.9,
                  label=f"{column}, mean of the last {window}")  # fmt: skip
    val_steps, val = run.series("val/loss")
    if val:
        axis.plot(val_steps, val, "s--", color="black", markersize=5, linewidth=1, label="val/loss")
    everything = values + val + [x for c in terms for x in run.series(c)[1]]
    if everything and min(everything) > 0 and max(everything) / min(everything) > 100:
        axis.set_yscale("log")
    title = "Training loss"
    if skipped:
        title += f"  ({', '.join(skipped)} not drawn: more than 10x the total's scale)"
    axis.set_title(title, fontsize=11)
    axis.set_xlabel("step")
    axis.grid(alpha=0.25)
    axis.legend(fontsize=8, loc="upper right")
    return png_bytes(figure)


# ------------------------------------------------------------------------------------------------------ FID
def fid_counts(run: RunFolder) -> tuple[set, set]:
    """The sample and reference counts the FID points were measured with."""
    rows = [r for r in run.metrics or [] if finite(r.get("fid/fid"))]
    samples = {int(r["fid/num_samples"]) for r in rows if finite(r.get("fid/num_samples"))}
    reference = {int(r["fid/num_reference"]) for r in rows if finite(r.get("fid/num_reference"))}
    return samples, reference


def _counts_text(counts: set) -> str:
    return "/".join(str(c) for c in sorted(counts)) or "?"


def fid_figure(run: RunFolder) -> bytes | None:
    steps, fid = run.series("fid/fid")
    if not fid:
        return None
    plt = pyplot()
    kid_steps, kid = run.series("fid/kid_x1000")
    samples, reference = fid_counts(run)
    figure, (left, right) = plt.subplots(1, 2, figsize=(15, 3.8), layout="constrained")
    left.plot(steps, fid, "o-", color="C3", linewidth=2)
    left.set_title("FID (lower is closer to the reference set)", fontsize=11)
    if kid:
        right.plot(kid_steps, kid, "o-", color="C4", linewidth=2)
    right.set_title("KID x 1000 (lower is closer)", fontsize=11)
    for axis, (s, v) in ((left, (steps, fid)), (right, (kid_steps, kid))):
        axis.set_xlabel("step")
        axis.grid(alpha=0.25)
        if v:
            axis.annotate(f"{v[-1]:.2f}", (s[-1], v[-1]), textcoords="offset points", xytext=(4, 6), fontsize=9)
    figure.suptitle(
        f"{_counts_text(samples)} samples against {_counts_text(reference)} reference images per point "
        "(FID and KID are biased by both counts: compare runs only at equal counts)",
        fontsize=10,
    )
    return png_bytes(figure)


# -------------------------------------------------------------------------------------------------- samples
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (matplotlib ships it), else PIL's default font."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def pick_evenly(items: list, count: int) -> list:
    """At most ``count`` of ``items``, evenly spaced, the first and the last always among them."""
    if len(items) <= count:
        return list(items)
    if count <= 1:
        return items[-1:]
    idx = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)})
    return [items[i] for i in idx]


def tile(images: list[Image.Image], columns: int, cell: int) -> Image.Image:
    """``images`` resized to ``cell`` pixels square (nearest when enlarging), ``columns`` to a row."""
    rows = max(1, -(-len(images) // columns))
    canvas = Image.new("RGB", (columns * cell, rows * cell), "white")
    for i, image in enumerate(images):
        image = image.convert("RGB")
        resample = Image.NEAREST if image.width <= cell else Image.LANCZOS
        canvas.paste(image.resize((cell, cell), resample), ((i % columns) * cell, (i // columns) * cell))
    return canvas


def _fit_height(image: Image.Image, height: int) -> Image.Image:
    if image.height == height:
        return image
    width = max(1, round(image.width * height / image.height))
    resample = Image.NEAREST if height > image.height else Image.LANCZOS
    return image.resize((width, height), resample)


def labelled_panels(
    panels: list[tuple[str, Image.Image, str]],
    row_labels: list[str] | None = None,
    max_height: int = 512,
    title_size: int = 24,
) -> Image.Image:
    """Panels side by side under their titles (``(title, image, colour)``), all scaled to one height; row labels,
    when given, are written down the left edge, one per grid row."""
    height = min(max_height, max(image.height for _, image, _ in panels))
    images = [_fit_height(image, height) for _, image, _ in panels]
    title_font, label_font = font(title_size), font(20)
    gap, top = 18, title_size * 2 + 16
    label_width = 0
    wrapped = []
    if row_labels:
        wrapped = [textwrap.fill(label, 22) for label in row_labels]
        label_width = 16 + max(int(label_font.getlength(line)) for text in wrapped for line in text.splitlines())
    width = label_width + sum(im.width for im in images) + gap * (len(images) + 1)
    canvas = Image.new("RGB", (width, top + height + gap), "white")
    draw = ImageDraw.Draw(canvas)
    x = label_width + gap
    for (title, _, colour), image in zip(panels, images):
        lines = textwrap.wrap(title, max(8, int(image.width / (title_size * 0.55))))[:2]
        for k, line in enumerate(lines):
            length = title_font.getlength(line)
            draw.text((x + (image.width - length) / 2, 6 + k * (title_size + 4)), line, fill=colour, font=title_font)
        canvas.paste(image, (x, top))
        x += image.width + gap
    if wrapped:
        row_height = height / len(wrapped)
        for k, text in enumerate(wrapped):
            n_lines = len(text.splitlines())
            y = top + (k + 0.5) * row_height - n_lines * 12
            draw.multiline_text((8, y), text, fill="black", font=label_font, spacing=3)
    return canvas


def samples_figure(
    grids: list[tuple[int, Path]],
    instance_files: list[Path],
    row_labels: list[str] | None,
    stage_at: dict[int, str] | None = None,
) -> bytes | None:
    """The instance images, then each sample grid titled with its step (and the monitor's stage at that step)."""
    if not grids:
        return None
    stage_at = stage_at or {}
    first = Image.open(grids[0][1])
    panels = []
    if instance_files:
        # A near-square block of the instance images, as high as the grids (their rows are not the grids' prompts).
        columns = max(1, math.isqrt(len(instance_files)))
        instance_rows = -(-len(instance_files) // columns)
        cell = max(16, first.height // instance_rows)
        # Read as the data module reads them for training: upright by EXIF, 16-bit scaled, transparency on white.
        instances = tile([load_image(f) for f in instance_files], columns, cell)
        panels.append((f"instance images ({len(instance_files)})", instances, "#444444"))
    for step, path in grids:
        stage = stage_at.get(step)
        title = f"step {step}" + (f" · {stage}" if stage and stage != "unknown" else "")
        panels.append((title, Image.open(path), STAGE_COLOURS.get(stage, "black")))
    return image_png(labelled_panels(panels, row_labels))


def samples_array(png: bytes) -> np.ndarray:
    """A PNG as an HxWx3 array (tests and W&B)."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
