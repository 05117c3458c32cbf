"""Export the trained model in diffusers format when training ends, with its model card."""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn


class DiffusersExport(L.Callback):
    """At the end of ``fit``, write ``module.save_pretrained(dirpath)`` on rank 0, and its model card.

    Args:
        dirpath: output folder (default: ``<log dir>/export``).
        lora_only: write only the LoRA weights (``load_lora_weights`` format) instead of a full pipeline
            (default False; a full export of a LoRA run holds the merged weights).
        model_card: write ``README.md`` with the Hub's metadata (base model, instance prompt, license, tags, widget
            images in ``images/``), the method's settings, the data and the monitors' final metrics
            (``lightning_ft.report.model_card``; default True). ``huggingface_hub.upload_folder`` publishes the
            folder as it is.
    """

    def __init__(self, dirpath: str | None = None, lora_only: bool = False, model_card: bool = True):
        self.dirpath, self.lora_only, self.model_card = dirpath, lora_only, model_card
        self.exported_to: Path | None = None
        self.card_path: Path | None = None

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
                if self.model_card:
                    self.card_path = self._write_card(trainer, pl_module)

    def _write_card(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        from lightning.pytorch.strategies import FSDPStrategy

        from lightning_ft.report.model_card import facts_from_fit, write_model_card

        sharded = isinstance(getattr(trainer, "strategy", None), FSDPStrategy)  # no sampling on gathered weights
        try:
            facts = facts_from_fit(trainer, pl_module, self.exported_to, self.lora_only, samples=not sharded)
            return write_model_card(self.exported_to, facts)
        except Exception as error:  # the weights are written: a card that fails must not fail the run
            rank_zero_warn(f"lightning-ft: no model card in {self.exported_to} ({type(error).__name__}: {error})")
            return None


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
