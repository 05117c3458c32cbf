"""``TextFamily``: the base of every text-to-image family (prompts in, text features out).

What every text family shares: samples are asked with prompts, the unconditional branch is the empty prompt (encoded
like any other; a family whose pipeline uses zeros instead says so in its ``encode``), condition dropout replaces a
prompt by ``""``, and the features of each prompt go through the module's text cache (``tokenize`` makes the ids that
key it, ``encode_ids`` the per-sample features).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_ft.core.components import Components, tokenizer_key
from lightning_ft.core.conditions import Condition
from lightning_ft.core.families.base import ModelFamily
from lightning_ft.core.families.inputs import SampleInputs


class TextFamily(ModelFamily):
    """Prompts -> text features (see the module docstring). Subclasses set ``text_encoders`` and ``encode_ids``,
    and ``token_length`` where a tokenizer pads to another length than its own ``model_max_length``."""

    task = "text-to-image"
    hub_task = "text-to-image"
    text_encoders = ("text_encoder",)

    def sample_inputs(self, prompts=None, labels=None, n=None, where="generate", required=True) -> SampleInputs:
        if prompts is None or len(prompts) == 0:
            if not required:
                return SampleInputs(int(n or 0))
            raise ValueError(f"{where}: this {self.describe()} model is asked with prompts, and none were given")
        return SampleInputs.of(prompts=[str(p) for p in prompts])

    def retention_inputs(self, count: int, prompts: Sequence[str] | None = None) -> SampleInputs:
        return SampleInputs.of(prompts=list(prompts or self.null_inputs(1))).cycle(count)

    def batch_inputs(self, batch: dict, prompts_key: str = "prompts", labels_key: str = "class_labels"):
        return list(batch[prompts_key])

    def raw_inputs(self, inputs: SampleInputs):
        return list(inputs.prompts)

    def null_inputs(self, n: int) -> list[str]:
        return [""] * n

    def with_null(self, inputs: list[str], drop: torch.Tensor) -> list[str]:
        return ["" if d else s for s, d in zip(inputs, drop.tolist())]

    def usage_example(self, prompt: str, settings: str) -> str | None:
        return f"image = pipe({prompt!r}{', ' + settings if settings else ''}).images[0]"

    def encode(self, module, inputs, n, geometry) -> Condition:
        return Condition(module.text_features(inputs), n)

    def tokenizer_keys(self, parts: Components) -> list[str]:
        """The tokenizers this model has, paired with ``text_encoders`` (an optional encoder may be absent)."""
        return [tokenizer_key(k) for k in self.text_encoders if parts.tokenizers.get(tokenizer_key(k)) is not None]

    def token_length(self, parts: Components, key: str) -> int:
        """The length tokenizer ``key`` pads and truncates to (default: its own ``model_max_length``)."""
        return parts.tokenizers[key].model_max_length

    def tokenize(self, parts: Components, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids (B, L) per tokenizer, padded and truncated to ``token_length`` as the pipelines do."""
        return [
            parts.tokenizers[key](
                list(prompts),
                padding="max_length",
                max_length=self.token_length(parts, key),
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for key in self.tokenizer_keys(parts)
        ]

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample text features from token ids (one tensor per tokenizer, on the encoders' device)."""
        raise NotImplementedError


class SequenceLengthCall:
    """Mixin of the text families whose pipeline's ``__call__`` takes ``height``, ``width`` and
    ``max_sequence_length``: samples are asked at the module's native side with the token length the family trains
    with (its ``max_sequence_length``; a family adds its own call arguments to ``super().pipeline_call_kwargs``). A
    family that sets ``default_length`` (the pipeline's own default) and trains with another length records it in its
    export as the ``pipeline_call`` a plain pipeline call must be given."""

    max_sequence_length: int
    default_length: int | None = None

    def pipeline_call_kwargs(self, module) -> dict:
        side = module.native_resolution()
        return {"height": side, "width": side, "max_sequence_length": self.max_sequence_length}

    def export(self, parts: Components, scheduler, path) -> dict:
        record = super().export(parts, scheduler, path)
        if self.default_length is not None and self.max_sequence_length != self.default_length:
            record["pipeline_call"] = {"max_sequence_length": self.max_sequence_length}
        return record
