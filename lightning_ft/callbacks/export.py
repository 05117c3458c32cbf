"""Export the trained model in diffusers format when training ends."""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning as L


class DiffusersExport(L.Callback):
    """At the end of ``fit``, write ``module.save_pretrained(dirpath)`` on rank 0.

    Args:
        dirpath: output folder (default: ``<log dir>/export``).
        lora_only: write only the LoRA weights (``load_lora_weights`` format) instead of a full pipeline
            (default False; a full export of a LoRA run holds the merged weights).
    """

    def __init__(self, dirpath: str | None = None, lora_only: bool = False):
        self.dirpath, self.lora_only = dirpath, lora_only
        self.exported_to: Path | None = None

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "export"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The CLI refuses this before anything is written; a fit started from Python is stopped here.
        if trainer.max_steps == 0:
            raise ValueError(
                "trainer.max_steps=0: fit would train nothing, and this callback would export the unchanged "
                "pretrained model as the run's result"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir is a collective call under DDP: every rank reads it, before rank 0 goes on alone.
        path = self.resolve_dir(trainer)
        with full_weights(trainer):
            if trainer.is_global_zero:
                self.exported_to = pl_module.save_pretrained(path, lora_only=self.lora_only)
                print(f"lightning-ft: exported diffusers model to {self.exported_to}")


@contextlib.contextmanager
def full_weights(trainer: L.Trainer):
    """Within this block rank 0's module holds its full (gathered) weights under FSDP, a collective every rank
    enters; nothing to do under other strategies."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(getattr(trainer, "strategy", None), FSDPStrategy):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(
        trainer.strategy.model, writeback=False, rank0_only=True, offload_to_cpu=True
    ):
        yield
