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
        lora_format: the layout of the LoRA file of a ``lora_only`` export: ``diffusers`` (default: the pipeline's
            ``load_lora_weights`` layout) or ``kohya`` (``lora_kohya.safetensors``, the single file ComfyUI and
            AUTOMATIC1111 / Forge load; SD1.x/2.x, SDXL and Flux.1, plain LoRA; ``lightning_ft.core.lora_formats``).
            Recorded in the folder's ``lightning_ft.json`` and model card. A family, adapter or method that cannot
            be written as kohya is refused when the fit starts, not after it.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        lora_only: bool = False,
        model_card: bool = True,
        lora_format: str = "diffusers",
    ):
        from lightning_ft.core.lora_formats import check_lora_format

        check_lora_format(lora_format)
        if lora_format != "diffusers" and not lora_only:
            raise ValueError(
                f"DiffusersExport(lora_format={lora_format!r}) writes a LoRA file: it needs lora_only=True (a full "
                "export is a diffusers pipeline with the LoRA merged in)"
            )
        self.dirpath, self.lora_only, self.model_card = dirpath, lora_only, model_card
        self.lora_format = lora_format
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
        if self.lora_format != "diffusers":
            self._check_lora_format(pl_module)

    def _check_lora_format(self, pl_module: L.LightningModule) -> None:
        """What would make the export fail after the whole fit: a family without a kohya layout, a model without a
        plain LoRA, a method whose export is more than its LoRA."""
        import inspect

        from lightning_ft.core.lora_formats import check_kohya_adapter, check_lora_format
        from lightning_ft.core.trainable import has_lora

        check_lora_format(self.lora_format, pl_module.family)
        if not has_lora(pl_module.denoiser):
            raise ValueError(
                f"DiffusersExport(lora_format={self.lora_format!r}) exports LoRA weights; this model trains none "
                f"(model.trainable={pl_module.hparams.get('trainable')!r}, not 'lora')"
            )
        check_kohya_adapter(pl_module.denoiser)
        if "lora_format" not in inspect.signature(pl_module.save_pretrained).parameters:
            raise NotImplementedError(
                f"DiffusersExport(lora_format={self.lora_format!r}): {type(pl_module).__name__}'s export writes "
                "modules of its own beside the LoRA, which a kohya file cannot hold; export it with "
                "lora_format='diffusers'"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir is a collective call under DDP: every rank reads it, before rank 0 goes on alone.
        path = self.resolve_dir(trainer)
        with full_weights(trainer):
            if trainer.is_global_zero:
                # lora_format goes only when set: methods whose export adds modules take no such argument.
                kwargs = {"lora_format": self.lora_format} if self.lora_format != "diffusers" else {}
                self.exported_to = pl_module.save_pretrained(path, lora_only=self.lora_only, **kwargs)
                what = f"{self.lora_format} LoRA" if self.lora_format != "diffusers" else "diffusers model"
                print(f"lightning-ft: exported {what} to {self.exported_to}")
                if self.model_card:
                    self.card_path = self._write_card(trainer, pl_module)

    def _write_card(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        from lightning.pytorch.strategies import FSDPStrategy

        from lightning_ft.report.model_card import facts_from_fit, write_model_card

        sharded = isinstance(getattr(trainer, "strategy", None), FSDPStrategy)  # no sampling on gathered weights
        try:
            # A quantised base exports its LoRA only (nothing is merged into quantised weights): the card says so.
            hparams = getattr(pl_module, "hparams", {})
            lora_only = self.lora_only or hparams.get("quantize", "none") not in (None, "none")
            facts = facts_from_fit(trainer, pl_module, self.exported_to, lora_only, samples=not sharded)
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
