"""Fine-tuning methods: each a small ``DiffusionBase`` subclass."""

from lightning_ft.methods.dreambooth import DreamBooth

__all__ = ["DreamBooth"]
