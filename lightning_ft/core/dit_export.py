"""A class-conditional DiT in the form plain ``diffusers.DiTPipeline`` samples with guidance.

``DiTPipeline`` is written for ImageNet: with ``guidance_scale > 1`` it asks the transformer for the null class by
the hard-coded index 1000 (``class_null = torch.tensor([1000] * batch_size)``). A DiT built for ``N`` classes
(``num_embeds_ada_norm = N``; diffusers' ``LabelEmbedding`` then holds ``N + 1`` rows, the last one the null row
learnt for classifier-free guidance) has no row 1000 when ``N < 1000``: the pipeline fails with an index error.

``dit_pipeline_denoiser`` pads the label table of every block to 1001 rows so index 1000 is the null row, and records
``num_embeds_ada_norm = 1000`` in the config so the saved folder loads with that table. The classes keep their
indices; the rows in between are further copies of the null row. ``dit_export_record`` is what an export stores
(in its ``lightning_ft.json`` under ``"class_labels"``) so that our own loader knows the real class count, and
``true_class_count`` reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from lightning_ft.core.trainable import has_lora, merged_copy

#: The null class index ``DiTPipeline`` uses, and hence the class count of a DiT it can guide (ImageNet's).
PIPELINE_NULL_CLASS = 1000
#: Key of the record in an export's ``lightning_ft.json``.
RECORD_KEY = "class_labels"


def _label_tables(denoiser: torch.nn.Module) -> list[LabelEmbedding]:
    return [m for m in denoiser.modules() if isinstance(m, LabelEmbedding)]


def dit_pipeline_denoiser(denoiser: DiTTransformer2DModel, null_class: int | None = None) -> DiTTransformer2DModel:
    """``denoiser`` as a DiT whose null class is index 1000, for ``DiTPipeline``'s classifier-free guidance.

    With ``N = num_embeds_ada_norm < 1000``: a copy (LoRA, if any, merged: ``merged_copy``) in which every block's
    label table has 1001 rows: rows ``0..N-1`` are the model's classes, unchanged; row 1000 is the null row; rows
    ``N..999`` are copies of the null row as well, so any index from ``N`` up means "no class" (never used by the
    pipeline for a real label: only 0..N-1 are classes). The config says ``num_embeds_ada_norm=1000``, so
    ``save_pretrained`` / ``from_pretrained`` give this table back. Outputs for labels ``0..N-1`` are exactly the
    model's, and label 1000 gives exactly the model's null output.

    The null row is the model's own (index ``N``, the ``LabelEmbedding`` CFG row) unless ``null_class`` names
    another row (as ``model.null_class`` may); rows ``N..1000`` are then copies of that row.

    With ``N == 1000`` the model already fits: it is returned as it is (not copied), or merged into a copy if it
    holds LoRA. ``N > 1000`` cannot be exported this way (row 1000 is a class): ValueError."""
    if not isinstance(denoiser, DiTTransformer2DModel):
        raise TypeError(f"dit_pipeline_denoiser needs a DiTTransformer2DModel, not {type(denoiser).__name__}")
    n = denoiser.config.num_embeds_ada_norm
    tables = _label_tables(denoiser)
    if not tables or any(t.num_classes != n or t.embedding_table.num_embeddings != n + 1 for t in tables):
        shapes = [(t.num_classes, t.embedding_table.num_embeddings) for t in tables]
        raise ValueError(f"expected label tables of {n} classes plus a null row, found (classes, rows) {shapes}")
    null = n if null_class is None else int(null_class)
    if not 0 <= null <= n:
        raise ValueError(f"null_class={null_class} is not a row of the {n + 1}-row label table")
    if n > PIPELINE_NULL_CLASS:
        raise ValueError(f"a DiT of {n} classes cannot be exported for DiTPipeline: its null class 1000 is a class")
    if n == PIPELINE_NULL_CLASS:
        if null != PIPELINE_NULL_CLASS:
            raise ValueError(f"DiTPipeline guides with class 1000 as the null class, not null_class={null_class}")
        return merged_copy(denoiser) if has_lora(denoiser) else denoiser

    model = merged_copy(denoiser)  # a deep copy in any case: train/eval mode, dtype, device and dropout carry over
    for table in _label_tables(model):
        old = table.embedding_table
        new = torch.nn.Embedding(
            PIPELINE_NULL_CLASS + 1, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype
        )
        with torch.no_grad():
            new.weight[:n] = old.weight[:n]
            new.weight[n:] = old.weight[null]
        new.weight.requires_grad_(old.weight.requires_grad)
        table.embedding_table = new
        table.num_classes = PIPELINE_NULL_CLASS  # LabelEmbedding drops labels to index num_classes
    model.register_to_config(num_embeds_ada_norm=PIPELINE_NULL_CLASS)
    return model


def dit_export_record(num_classes: int, null_class: int) -> dict:
    """What an export of a DiT padded by ``dit_pipeline_denoiser`` stores in its ``lightning_ft.json`` under
    ``"class_labels"``: the real class count (the folder's config says 1000), the null class of the trained model
    (still a null row in the padded table: index ``N`` is one of the padded copies, an index below ``N`` is kept),
    and the null class ``DiTPipeline`` uses."""
    num_classes, null_class = int(num_classes), int(null_class)
    if not 0 < num_classes <= PIPELINE_NULL_CLASS:
        raise ValueError(f"num_classes={num_classes} must be in 1..{PIPELINE_NULL_CLASS} for a DiTPipeline export")
    if not 0 <= null_class <= num_classes:
        raise ValueError(f"null_class={null_class} must be in 0..{num_classes}")
    return {
        "num_classes": num_classes,
        "null_class": null_class,
        "pipeline_null_class": PIPELINE_NULL_CLASS,
        "padded": num_classes < PIPELINE_NULL_CLASS,
    }


def true_class_count(denoiser: torch.nn.Module, declaration: Mapping | None = None) -> int:
    """The number of real classes of a class-conditional DiT: ``num_classes`` of the export record, given as the
    whole ``lightning_ft.json`` content (record under ``"class_labels"``) or as the record itself; without a record,
    the denoiser's own ``num_embeds_ada_norm`` (a model that was never padded)."""
    record = None
    if declaration is not None:
        record = declaration.get(RECORD_KEY, declaration if "num_classes" in declaration else None)
    if record is not None:
        return int(record["num_classes"])
    count = getattr(getattr(denoiser, "config", None), "num_embeds_ada_norm", None)
    if count is None:
        raise ValueError(f"{type(denoiser).__name__} has no class count (num_embeds_ada_norm) and no export record")
    return int(count)
