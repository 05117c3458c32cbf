"""Offline evaluation: the embedded world's feature net, swappable backbones and the scores built on them."""

from lightning_ft.metrics.backbones import BACKBONES, FeatureExtractor, as_backbone, make_backbone
from lightning_ft.metrics.feature_net import ShapesFeatureNet, default_feature_net
from lightning_ft.metrics.scores import (
    FIDScorer,
    diversity,
    features,
    fid_kid,
    high_frequency_energy,
    memorisation,
    parse_prompt,
    prompt_accuracy,
    subject_fidelity,
)

__all__ = [
    "BACKBONES",
    "FIDScorer",
    "FeatureExtractor",
    "ShapesFeatureNet",
    "as_backbone",
    "default_feature_net",
    "diversity",
    "features",
    "fid_kid",
    "high_frequency_energy",
    "make_backbone",
    "memorisation",
    "parse_prompt",
    "prompt_accuracy",
    "subject_fidelity",
]
