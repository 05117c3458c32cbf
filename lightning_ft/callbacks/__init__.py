"""Callbacks: export, sample grids (and, with later methods, training monitors)."""

from lightning_ft.callbacks.corruption_monitor import CorruptionStageMonitor
from lightning_ft.callbacks.export import DiffusersExport
from lightning_ft.callbacks.sample_grid import SampleGridLogger

__all__ = ["CorruptionStageMonitor", "DiffusersExport", "SampleGridLogger"]
