"""Fine-tuning methods: each a small ``DiffusionBase`` subclass."""

from lightning_ft.methods.a3fta import AdapterAttentionFineTuning
from lightning_ft.methods.anl import ConditionTuning
from lightning_ft.methods.bnn import BayesianFineTuning
from lightning_ft.methods.diff_tuning import DiffTuning
from lightning_ft.methods.dreambooth import DreamBooth
from lightning_ft.methods.sdft import SelfDistillationFineTuning

__all__ = [
    "AdapterAttentionFineTuning",
    "BayesianFineTuning",
    "ConditionTuning",
    "DiffTuning",
    "DreamBooth",
    "SelfDistillationFineTuning",
]
