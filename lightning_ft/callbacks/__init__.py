"""Callbacks: export, sample grids, monitors of the corruption stage and of FID/KID over training, the run report."""

from lightning_ft.callbacks.corruption_monitor import CorruptionStageMonitor
from lightning_ft.callbacks.export import DiffusersExport
from lightning_ft.callbacks.fid_monitor import FIDMonitor
from lightning_ft.callbacks.run_report import RunReport
from lightning_ft.callbacks.sample_grid import SampleGridLogger

__all__ = ["CorruptionStageMonitor", "DiffusersExport", "FIDMonitor", "RunReport", "SampleGridLogger"]
