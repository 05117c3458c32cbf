"""Class labels of class-conditional denoisers: which index is the null ("unconditional") class.

diffusers' DiT embeds labels with ``LabelEmbedding``, whose table has one extra row (index ``num_classes``) when the
model was built for classifier-free guidance, and which drops labels to that row on its own in training mode
(10%, hard-coded). Here the drop is switched off and done by ``DiffusionBase.condition_dropout`` instead, so that
it is configurable, visible in the config, and never applied to a frozen teacher or to memory samples that carry
the null class on purpose. UNets with ``num_class_embeds`` have no null row: the user names one (``null_class``).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import LabelEmbedding


def label_embeddings(denoiser: torch.nn.Module) -> list[LabelEmbedding]:
    return [m for m in denoiser.modules() if isinstance(m, LabelEmbedding)]


def num_label_rows(denoiser: torch.nn.Module) -> int | None:
    """Rows of the denoiser's class-embedding table (None when it has no class embedding)."""
    tables = label_embeddings(denoiser)
    if tables:
        return tables[0].embedding_table.num_embeddings
    embedding = getattr(denoiser, "class_embedding", None)
    return embedding.num_embeddings if isinstance(embedding, torch.nn.Embedding) else None


def resolve_null_class(denoiser: torch.nn.Module, null_class: int | None) -> int | None:
    """The null class to use: ``null_class`` if given (checked against the table), else the model's own null row
    (DiT built with label dropout: index ``num_classes``), else None (no classifier-free guidance).

    Also switches off the built-in label dropout of ``LabelEmbedding`` (see the module docstring)."""
    tables = label_embeddings(denoiser)
    for table in tables:
        table.dropout_prob = 0.0
    rows = num_label_rows(denoiser)
    if null_class is not None:
        if rows is not None and not 0 <= null_class < rows:
            raise ValueError(f"model.null_class={null_class} is outside the denoiser's {rows} class embeddings")
        return null_class
    if tables and tables[0].embedding_table.num_embeddings > tables[0].num_classes:
        return tables[0].num_classes
    return None
