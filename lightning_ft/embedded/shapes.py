"""The embedded shapes world: a procedural source domain rendered from attributes.

Every image is a single shape (one of ``SHAPES``) in one of ``COLORS`` on one of ``BACKGROUNDS``, with a random
size, position and rotation, captioned as ``"a red star on a gray background"``. Sampling is deterministic by
``(seed, index)``, so a dataset is unlimited and reproducible without storing a file.

Rendering is done in numpy with 4x supersampling (anti-aliased edges) and needs nothing else. The same renderer
draws the few-shot targets (``lightning_ft.embedded.targets``): a subject with two-tone stripes and an outline style,
which the source domain never shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 180, 60),
    "cyan": (40, 210, 220),
    "blue": (40, 80, 240),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
BACKGROUNDS = {"black": (10, 10, 10), "gray": (128, 128, 128), "navy": (20, 24, 90)}
# Tokens kept out of every pretraining caption so that fine-tuning can bind them to a new subject.
RESERVED_TOKENS = ("sks", "qwe", "zxy")
# Words a caption of this world can use, plus the words of the few-shot targets' prompts.
CAPTION_WORDS = ("a", "on", "background", "striped", "outlined", "shape")

_SUPERSAMPLE = 4
NUM_CLASSES = len(SHAPES) * len(COLORS)


@dataclass(frozen=True)
class ShapeSpec:
    """Attributes of one rendered image. ``size`` is the shape's outer radius as a fraction of the image width;
    ``cx, cy`` are its centre in [0, 1]; ``angle`` is in radians. ``stripes`` = (second colour, period in
    fractions of the width) draws two-tone stripes; ``outline`` (stroke width as a fraction of the radius) draws
    only the rim."""

    shape: str
    color: str
    background: str
    size: float
    cx: float
    cy: float
    angle: float
    stripes: tuple[str, float] | None = None
    outline: float | None = None

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"

    def partial_caption(self, color: bool, background: bool) -> str:
        """The caption with the colour and/or the background left out ("a star on a gray background", "a red
        star", "a star"): a model pretrained on some of these follows prompts that name fewer attributes."""
        words = f"a {self.color} {self.shape}" if color else f"a {self.shape}"
        return f"{words} on a {self.background} background" if background else words


def vocabulary() -> list[str]:
    """All words of the world's captions and target prompts, reserved tokens included (sorted, unique)."""
    words = set(SHAPES) | set(COLORS) | set(BACKGROUNDS) | set(CAPTION_WORDS) | set(RESERVED_TOKENS)
    return sorted(words)


def sample_spec(rng: np.random.Generator, **fixed) -> ShapeSpec:
    """Draw random attributes; any attribute given in ``fixed`` is kept as given."""
    size = float(rng.uniform(0.22, 0.42))
    margin = size * 0.8
    values = dict(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        size=size,
        cx=float(rng.uniform(margin, 1 - margin)),
        cy=float(rng.uniform(margin, 1 - margin)),
        angle=float(rng.uniform(0, 2 * np.pi)),
    )
    values.update(fixed)
    return ShapeSpec(**values)


def _polygon_radius(phi: np.ndarray, r_outer: float, r_inner: float, n: int) -> np.ndarray:
    """Radial distance of a regular n-gon (r_inner == r_outer) or n-pointed star edge at polar angle ``phi``.

    The edge between the vertex at angle 0 (radius r1) and angle alpha (radius r2) meets the ray at angle p in
    r1 r2 sin(alpha) / (r1 sin(p) + r2 sin(alpha - p))."""
    if r_inner == r_outer:
        alpha = 2 * np.pi / n
        p = np.mod(phi, alpha)
        return r_outer * np.sin(alpha) / (np.sin(p) + np.sin(alpha - p))
    alpha = np.pi / n
    p = np.mod(phi, 2 * alpha)
    # Mirror the second half of each period so that every ray goes from an outer to an inner vertex.
    p = np.where(p > alpha, 2 * alpha - p, p)
    return r_outer * r_inner * np.sin(alpha) / (r_outer * np.sin(p) + r_inner * np.sin(alpha - p))


def shape_mask(spec: ShapeSpec, resolution: int) -> np.ndarray:
    """Coverage of the shape on a ``resolution`` grid, in [0, 1] (anti-aliased by supersampling)."""
    n = resolution * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords - spec.cx, coords - spec.cy)
    c, s = np.cos(spec.angle), np.sin(spec.angle)
    u, v = c * x + s * y, -s * x + c * y
    r = np.hypot(u, v)
    phi = np.mod(np.arctan2(v, u) - np.pi / 2, 2 * np.pi)  # vertex 0 points up
    R = spec.size
    if spec.shape == "circle":
        inside = r <= R
    elif spec.shape == "ring":
        inside = (r <= R) & (r >= 0.55 * R)
    elif spec.shape == "square":
        inside = (np.abs(u) <= R * 0.75) & (np.abs(v) <= R * 0.75)
    elif spec.shape == "triangle":
        inside = r <= _polygon_radius(phi, R, R, 3)
    elif spec.shape == "star":
        inside = r <= _polygon_radius(phi, R, 0.45 * R, 5)
    elif spec.shape == "cross":
        w = 0.3 * R
        inside = ((np.abs(u) <= w) & (np.abs(v) <= R)) | ((np.abs(v) <= w) & (np.abs(u) <= R))
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    mask = inside.astype(np.float32)
    if spec.outline is not None:
        # The rim: inside the shape but not inside the shape eroded by the stroke width.
        eroded = shape_mask(
            ShapeSpec(**{**spec.__dict__, "size": spec.size * (1 - spec.outline), "outline": None}), resolution
        )
        full = mask.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))
        return np.clip(full - eroded, 0.0, 1.0)
    return mask.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))


def _stripe_field(spec: ShapeSpec, resolution: int) -> np.ndarray:
    """1 where the second stripe colour shows, 0 elsewhere; stripes run across the shape's own rotated axis."""
    period = spec.stripes[1]
    n = resolution * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords - spec.cx, coords - spec.cy)
    v = -np.sin(spec.angle) * x + np.cos(spec.angle) * y
    field = (np.mod(v / period, 1.0) >= 0.5).astype(np.float32)
    return field.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: ShapeSpec, resolution: int = 32) -> np.ndarray:
    """Render ``spec`` as a uint8 array of shape (resolution, resolution, 3)."""
    mask = shape_mask(spec, resolution)[..., None]
    fg = np.asarray(COLORS[spec.color], np.float32)
    bg = np.asarray(BACKGROUNDS[spec.background], np.float32)
    if spec.stripes is not None:
        second = np.asarray(COLORS[spec.stripes[0]], np.float32)
        t = _stripe_field(spec, resolution)[..., None]
        fg = fg * (1 - t) + second * t
    image = bg * (1 - mask) + fg * mask
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def class_label(spec: ShapeSpec) -> int:
    """The class of a class-conditional model of this world: shape x colour (``NUM_CLASSES`` = 48; the background
    is left to chance), ``shape_index * 8 + colour_index``."""
    return SHAPES.index(spec.shape) * len(COLORS) + list(COLORS).index(spec.color)


def class_name(label: int) -> str:
    """``class_label``'s inverse as words: 13 -> "orange square"."""
    return f"{list(COLORS)[label % len(COLORS)]} {SHAPES[label // len(COLORS)]}"


PATTERNS = ("plain", "striped", "outlined", "striped-outlined")
STRIPE_COLORS = ("none",) + tuple(COLORS)


def pattern(spec: ShapeSpec) -> str:
    """The spec's surface: ``plain``, ``striped``, ``outlined`` or ``striped-outlined``."""
    return PATTERNS[(spec.stripes is not None) + 2 * (spec.outline is not None)]


def labels(spec: ShapeSpec) -> dict[str, int]:
    """Integer attribute labels, as the feature network's heads index them: shape, (main) colour, background, and
    the surface that tells a specific instance from its class: ``pattern`` (``PATTERNS``) and ``stripe_color``
    (``STRIPE_COLORS``, ``none`` for unstriped shapes)."""
    return {
        "shape": SHAPES.index(spec.shape),
        "color": list(COLORS).index(spec.color),
        "background": list(BACKGROUNDS).index(spec.background),
        "pattern": PATTERNS.index(pattern(spec)),
        "stripe_color": STRIPE_COLORS.index(spec.stripes[0] if spec.stripes else "none"),
    }


def spec_for_index(seed: int, index: int, **fixed) -> ShapeSpec:
    """The deterministic spec of item ``index`` of the stream with ``seed``."""
    return sample_spec(np.random.default_rng((seed, index)), **fixed)


def styled(spec: ShapeSpec, rng: np.random.Generator, stripes: bool, outline: bool) -> ShapeSpec:
    """``spec`` with two-tone stripes (another colour, period 0.08-0.3 of the width) and/or an outline (0.25-0.45 of
    the radius)."""
    extra = {}
    if stripes:
        others = [c for c in COLORS if c != spec.color]
        extra["stripes"] = (others[rng.integers(len(others))], float(rng.uniform(0.08, 0.3)))
    if outline:
        extra["outline"] = float(rng.uniform(0.25, 0.45))
    return ShapeSpec(**{**spec.__dict__, **extra})
