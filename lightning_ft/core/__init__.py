"""The shared core: ``DiffusionBase`` and the helpers it is made of."""

from lightning_ft.core.base import DiffusionBase

__all__ = ["DiffusionBase"]
