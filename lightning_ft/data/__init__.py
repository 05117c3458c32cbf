"""Datamodules and datasets for limited image folders."""

from lightning_ft.data.datamodule import LimitedDataModule

__all__ = ["LimitedDataModule"]
