"""Offline evaluation: swappable metric backbones (DINO, CLIP, Inception, or one a model folder declares) and the
scores built on them."""

from lightning_ft.metrics.backbones import (
    BACKBONES,
    ROLE_DEFAULTS,
    FeatureExtractor,
    as_backbone,
    backbone_spec,
    declared_backbones,
    make_backbone,
    resolve_backbone,
)
from lightning_ft.metrics.images import as_float_images
from lightning_ft.metrics.prompt_scores import CLIPTextScore
from lightning_ft.metrics.scores import (
    FIDScorer,
    diversity,
    features,
    fid_kid,
    high_frequency_energy,
    memorisation,
    subject_fidelity,
)

__all__ = [
    "BACKBONES",
    "CLIPTextScore",
    "FIDScorer",
    "FeatureExtractor",
    "ROLE_DEFAULTS",
    "as_backbone",
    "as_float_images",
    "backbone_spec",
    "declared_backbones",
    "diversity",
    "features",
    "fid_kid",
    "high_frequency_energy",
    "make_backbone",
    "memorisation",
    "resolve_backbone",
    "subject_fidelity",
]
