"""Fine-tuning methods: each a small ``DiffusionBase`` subclass."""

from lightning_ft.methods.bnn import BayesianFineTuning
from lightning_ft.methods.dreambooth import DreamBooth

__all__ = ["BayesianFineTuning", "DreamBooth"]
