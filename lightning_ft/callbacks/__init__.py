"""Callbacks: export, sample grids, monitors of the corruption stage, of FID/KID and of a ControlNet's control
adherence over training, the run report, the checkpoint and stop on SIGTERM/SIGINT."""

from lightning_ft.callbacks.control_monitor import ControlAdherenceMonitor
from lightning_ft.callbacks.corruption_monitor import CorruptionStageMonitor
from lightning_ft.callbacks.export import DiffusersExport
from lightning_ft.callbacks.fid_monitor import FIDMonitor
from lightning_ft.callbacks.graceful_stop import GracefulStop
from lightning_ft.callbacks.run_report import RunReport
from lightning_ft.callbacks.sample_grid import SampleGridLogger

__all__ = [
    "ControlAdherenceMonitor",
    "CorruptionStageMonitor",
    "DiffusersExport",
    "FIDMonitor",
    "GracefulStop",
    "RunReport",
    "SampleGridLogger",
]
