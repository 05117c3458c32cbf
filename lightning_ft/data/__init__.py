"""Datamodules and datasets: limited image folders and the embedded shapes world."""

from lightning_ft.data.datamodule import LimitedDataModule
from lightning_ft.data.shapes_datamodule import ShapesDataModule

__all__ = ["LimitedDataModule", "ShapesDataModule"]
