"""``Condition``: what a denoiser is conditioned on, for a batch, as one typed object.

Every model family encodes its inputs (prompts, class labels, image sizes) into a ``Condition`` whose fields are
tensors with the batch on dim 0, named as the family's denoiser call reads them (``encoder_hidden_states`` of a
UNet, ``text_embeds`` and ``time_ids`` of SDXL, ``class_labels`` of a DiT, ...). Methods never look inside: they
concatenate conditions (``Condition.cat``), take parts of them (``cond[:n]``), choose per sample between two
(``where``) and hand them to ``DiffusionBase.predict``. An unconditional model's condition has no fields and only a
length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Condition:
    """Per-sample condition tensors (batch on dim 0) and the batch size; see the module docstring."""

    fields: dict[str, torch.Tensor] = field(default_factory=dict)
    size: int | None = None

    def __post_init__(self):
        sizes = {name: len(value) for name, value in self.fields.items()}
        if self.size is None:
            if not sizes:
                raise ValueError("a Condition without fields needs its batch size")
            self.size = next(iter(sizes.values()))
        wrong = {name: n for name, n in sizes.items() if n != self.size}
        if wrong:
            raise ValueError(f"Condition fields {wrong} do not have the batch size {self.size}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index) -> Condition:
        """The condition of some samples: a slice, an index tensor or a list of indices."""
        size = len(range(self.size)[index]) if isinstance(index, slice) else len(index)
        return Condition({name: value[index] for name, value in self.fields.items()}, size)

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def get(self, name: str, default=None):
        return self.fields.get(name, default)

    def replace(self, **fields: torch.Tensor | None) -> Condition:
        """A copy with ``fields`` set (None removes a field)."""
        new = dict(self.fields)
        for name, value in fields.items():
            if value is None:
                new.pop(name, None)
            else:
                new[name] = value
        return Condition(new, self.size)

    def to(self, *args, **kwargs) -> Condition:
        """Move every field (``Tensor.to`` arguments; integer fields keep their dtype when a dtype is given)."""
        moved = {}
        for name, value in self.fields.items():
            if value.is_floating_point():
                moved[name] = value.to(*args, **kwargs)
            else:
                device = kwargs.get("device", next((a for a in args if not isinstance(a, torch.dtype)), None))
                moved[name] = value.to(device) if device is not None else value
        return Condition(moved, self.size)

    def where(self, mask: torch.Tensor, other: Condition) -> Condition:
        """Per sample: ``other`` where ``mask`` is True, this condition elsewhere (same fields and size)."""
        if set(self.fields) != set(other.fields) or len(other) != self.size:
            raise ValueError("Condition.where needs two conditions with the same fields and batch size")
        out = {}
        for name, value in self.fields.items():
            m = mask.to(value.device).view(-1, *([1] * (value.ndim - 1)))
            out[name] = torch.where(m, other.fields[name].to(value), value)
        return Condition(out, self.size)

    @staticmethod
    def cat(conditions: Sequence[Condition]) -> Condition:
        """Concatenate conditions along the batch (they must have the same fields)."""
        conditions = list(conditions)
        names = set(conditions[0].fields)
        if any(set(c.fields) != names for c in conditions):
            raise ValueError(f"Condition.cat: fields differ ({[sorted(c.fields) for c in conditions]})")
        size = sum(len(c) for c in conditions)
        return Condition({n: torch.cat([c.fields[n] for c in conditions]) for n in conditions[0].fields}, size)

    def repeat(self, times: int) -> Condition:
        """The batch repeated ``times`` times (``[c, c, ...]``, as ``torch.cat([c] * times)``)."""
        return Condition.cat([self] * times)
