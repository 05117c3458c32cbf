"""Prompt fidelity in the embedded world (the CLIP-T role): does a sample show what its prompt names?

The feature network classifies each sample's shape, colour and background, and the prompt's words say which were
asked for; the score is the fraction that agree, per attribute.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from lightning_ft.embedded.feature_net import ShapesFeatureNet, default_feature_net
from lightning_ft.embedded.shapes import RESERVED_TOKENS

PROMPT_ATTRIBUTES = ("shape", "color", "background")

_ALIASES = {"grey": "gray", "violet": "purple"}


def parse_prompt(prompt: str, label_names: dict[str, list[str]]) -> dict[str, int]:
    """Class index per attribute named in ``prompt``; attributes it does not name (e.g. the shape of a subject
    called ``sks``) are absent. When a prompt names two values of one attribute, the first is taken: captions put
    the main colour first (``"a red star with blue stripes"``)."""
    found: dict[str, int] = {}
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in RESERVED_TOKENS:
            continue
        word = _ALIASES.get(word, word)
        # Plurals ("stars", "crosses") name the same class.
        candidates = [word] + ([word[:-1]] if word.endswith("s") else []) + ([word[:-2]] if word.endswith("es") else [])
        for attribute, names in label_names.items():
            match = next((c for c in candidates if c in names), None)
            if attribute not in found and match is not None:
                found[attribute] = names.index(match)
    return found


@torch.no_grad()
def prompt_accuracy(
    images: Tensor,
    prompts: list[str],
    net: ShapesFeatureNet | None = None,
    attributes: tuple[str, ...] = PROMPT_ATTRIBUTES,
) -> dict[str, float]:
    """Attribute accuracy of images against their prompts, judged by the shapes net (the CLIP-T role).

    Args:
        images: (N, 3, H, W) in [0, 1].
        prompts: N prompts; each attribute a prompt names (shape, colour, background) is scored for its image.
        net: a ``ShapesFeatureNet``; default: the shipped net.
        attributes: the heads scored (default shape, colour, background: what a caption names; the stripe colour
            head shares the colour words and is left out).

    Returns ``{attribute: accuracy}`` (NaN when no prompt names it) and ``{"n_" + attribute: count}``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    net = net if net is not None else default_feature_net()
    if not isinstance(net, ShapesFeatureNet):
        raise TypeError("prompt_accuracy needs a ShapesFeatureNet (a classifier of the shapes world's attributes)")
    names = {k: net.label_names[k] for k in attributes}
    preds = {k: [] for k in names}
    for i in range(0, len(images), 256):
        for k, p in net.predict(images[i : i + 256]).items():
            if k in preds:
                preds[k].append(p.cpu())
    preds = {k: torch.cat(v) for k, v in preds.items()}
    targets = [parse_prompt(p, names) for p in prompts]
    result: dict[str, float] = {}
    for attribute in names:
        scored = [(i, t[attribute]) for i, t in enumerate(targets) if attribute in t]
        correct = sum(int(preds[attribute][i]) == label for i, label in scored)
        result[attribute] = correct / len(scored) if scored else float("nan")
        result[f"n_{attribute}"] = len(scored)
    return result
