"""``SampleInputs``: what a set of samples is asked with, as one small value the model's family builds.

A text-to-image model is asked with prompts, a class-conditional one with labels, an unconditional one with nothing
but a count (and, for control and editing models, images beside the prompts). Callbacks, the report, the data module
and the methods offer what they have (``family.sample_inputs(prompts=..., labels=..., n=...)``); the family keeps
what its model reads and refuses what is missing, so nothing outside the families asks which kind a model is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SampleInputs:
    """The inputs of ``count`` samples: ``prompts`` (one per sample), ``labels`` (one per sample), or neither; and
    ``controls``, one control image per sample ((3, H, W) in [0, 1]) for a model with a ControlNet
    (``ModelFamily.with_controls`` adds them); ``sources``, one source image per sample ((3, H, W) in [0, 1]) for an
    editing model, the image its samples are edits of (``ModelFamily.with_sources`` adds them)."""

    count: int
    prompts: tuple[str, ...] | None = None
    labels: tuple[int, ...] | None = None
    controls: tuple | None = None
    sources: tuple | None = None

    def __post_init__(self):
        for name in ("prompts", "labels", "controls", "sources"):
            values = getattr(self, name)
            if values is not None and len(values) != self.count:
                raise ValueError(f"SampleInputs: {len(values)} {name} for {self.count} samples")

    def __len__(self) -> int:
        return self.count

    def _map(self, pick) -> SampleInputs:
        prompts = tuple(pick(self.prompts)) if self.prompts is not None else None
        labels = tuple(pick(self.labels)) if self.labels is not None else None
        controls = tuple(pick(self.controls)) if self.controls is not None else None
        sources = tuple(pick(self.sources)) if self.sources is not None else None
        return SampleInputs(len(pick(range(self.count))), prompts, labels, controls, sources)

    def __getitem__(self, index: slice) -> SampleInputs:
        return self._map(lambda values: values[index])

    def take(self, indices: Sequence[int]) -> SampleInputs:
        """The inputs of samples ``indices``, in that order."""
        return self._map(lambda values: [values[i] for i in indices])

    def cycle(self, n: int) -> SampleInputs:
        """``n`` samples that go round these inputs (sample i asks what input i mod count asks)."""
        return self._map(lambda values: [values[i % self.count] for i in range(n)])

    def each(self, times: int) -> SampleInputs:
        """Every input ``times`` times in a row (a grid row per input)."""
        return self._map(lambda values: [v for v in values for _ in range(times)])

    def distinct(self) -> SampleInputs:
        """The inputs without repeats, in order (with control or source images: the samples whose (prompt or label,
        image) pair is new)."""
        images = self.controls if self.controls is not None else self.sources
        if images is not None:
            keys = [(value, id(image)) for value, image in zip(self.values(), images)]
            return self.take([i for i, key in enumerate(keys) if keys.index(key) == i])
        return self._map(lambda values: list(dict.fromkeys(values)))

    def with_controls(self, controls) -> SampleInputs:
        """These inputs with one control image per sample (a (N, 3, H, W) tensor or a sequence of (3, H, W))."""
        return SampleInputs(self.count, self.prompts, self.labels, tuple(controls), self.sources)

    def with_sources(self, sources) -> SampleInputs:
        """These inputs with one source image per sample (a (N, 3, H, W) tensor or a sequence of (3, H, W))."""
        return SampleInputs(self.count, self.prompts, self.labels, self.controls, tuple(sources))

    @property
    def images(self) -> tuple | None:
        """The image each sample is asked with besides its prompt or label (its control or source image), or None."""
        return self.controls if self.controls is not None else self.sources

    @property
    def conditional(self) -> bool:
        """True when the samples are asked with something (prompts or labels), not only a count."""
        return self.prompts is not None or self.labels is not None

    def values(self) -> list:
        """Per sample: its prompt, its label, or None."""
        if self.prompts is not None:
            return list(self.prompts)
        if self.labels is not None:
            return list(self.labels)
        return [None] * self.count

    def texts(self) -> list[str]:
        """Per sample, the words a grid, a card or a report shows beside it."""
        if self.prompts is not None:
            return list(self.prompts)
        if self.labels is not None:
            return [f"class {label}" for label in self.labels]
        return [""] * self.count

    def generate_kwargs(self) -> dict:
        """The arguments of ``DiffusionBase.generate`` that ask for these samples (without seeds)."""
        kwargs = {}
        if self.prompts is not None:
            kwargs = {"prompts": list(self.prompts)}
        elif self.labels is not None:
            kwargs = {"labels": list(self.labels)}
        if self.controls is not None:
            import torch

            kwargs["controls"] = torch.stack([torch.as_tensor(c) for c in self.controls])
        if self.sources is not None:
            import torch

            kwargs["sources"] = torch.stack([torch.as_tensor(s) for s in self.sources])
        return kwargs

    def meta(self) -> dict:
        """The inputs as JSON-ready values (a sampled folder's record; control and source images as their count)."""
        kwargs = self.generate_kwargs()
        if "controls" in kwargs:
            kwargs["controls"] = f"{len(self.controls)} control images"
        if "sources" in kwargs:
            kwargs["sources"] = f"{len(self.sources)} source images"
        return kwargs

    @staticmethod
    def of(prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None, n: int | None = None):
        """Inputs from whichever is given (prompts first); ``n`` alone: that many unconditional samples."""
        if prompts is not None:
            return SampleInputs(len(prompts), prompts=tuple(prompts))
        if labels is not None:
            return SampleInputs(len(labels), labels=tuple(int(label) for label in labels))
        return SampleInputs(int(n or 0))
