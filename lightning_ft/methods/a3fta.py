"""A3FTA: adapter-augmented attention fine-tuning ("Fine-Tuning Diffusion Models with Limited Data", NeurIPS 2022
workshop; docs/methods.md, A3FTA).

Only the attention layers of the denoiser train (q/k/v/out projections and their norms; resnets, convolutions and
the time embedding stay frozen), and a time-aware adapter sits between each attention operation and its output
projection (``lightning_ft.nn.adapters``). What was read: attention-only fine-tuning overfits less than full
fine-tuning, and the adapter (time fusion, cross-attention, time scaling) improves it further at ~1.8% extra
parameters. **Inferred** (docs/methods.md, A3FTA): the exact adapter layers, reduction 8, 4 heads, zero-initialised
output, and the two learning rates (1e-4 for the adapters, 2e-5 for the pretrained attention).

The adapters stay in the graph at inference (they cannot be folded into ``W_o``): the export writes the plain
pipeline (with the fine-tuned attention) plus ``a3fta_adapters/``, which this class (``pretrained=export``) or
``lightning_ft.nn.adapters.load_adapters(pipe.unet, export)`` puts back. Plain diffusers loading of the folder alone
gives the model without its adapters.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lightning_ft.methods.dreambooth import DreamBooth
from lightning_ft.nn.adapters import (
    ADAPTER_FOLDER,
    TimeAwareAdapter,
    insert_adapters,
    load_adapters,
    save_adapters,
    without_adapters,
)


class AdapterAttentionFineTuning(DreamBooth):
    """Attention-only fine-tuning with time-aware adapters before each attention output projection.

    Args:
        trainable: the pretrained weights that train besides the adapters (default ``attention``, as A3FTA;
            ``none`` trains the adapters alone).
        lr: learning rate of the pretrained attention weights (default 2e-5, inferred).
        adapter_lr: learning rate of the adapters (default 1e-4, inferred).
        adapter_targets: attention modules that get an adapter, by the last part of their name (default None: the
            family's, ``["attn1", "attn2"]`` (self- and cross-attention of UNet, DiT and PixArt blocks) or
            ``["attn", "attn2"]`` (the joint attention of SD3 / Flux: its image stream)).
        adapter_reduction: the adapter's width is ``channels / adapter_reduction`` (default 8, inferred).
        adapter_heads: heads of the adapter's cross-attention (default 4, inferred).
        **kwargs: see ``DreamBooth`` (prior preservation when class images are configured) and ``DiffusionBase``.
    """

    export_folder = ADAPTER_FOLDER
    trains_controlnets = False  # its adapters are the trained part of the denoiser

    def __init__(
        self,
        *args,
        trainable: str = "attention",
        lr: float = 2e-5,
        adapter_lr: float = 1e-4,
        adapter_targets: list[str] | None = None,
        adapter_reduction: int = 8,
        adapter_heads: int = 4,
        **kwargs,
    ):
        if trainable not in ("attention", "none"):
            raise ValueError(
                f"A3FTA trains attention (+ adapters): model.trainable must be 'attention' or 'none', not {trainable!r}"
            )
        if adapter_reduction < 1 or adapter_heads < 1:
            raise ValueError(
                f"model.adapter_reduction={adapter_reduction} and adapter_heads={adapter_heads} must be >= 1"
            )
        super().__init__(*args, trainable=trainable, lr=lr, **kwargs)

    def adapter_config(self) -> dict:
        h = self.hparams
        targets = h.adapter_targets or self.family.attention_names
        return {"targets": list(targets), "reduction": h.adapter_reduction, "heads": h.adapter_heads,
                "time_embedding": self.family.time_embedding}  # fmt: skip

    def configure_trainable(self) -> None:
        super().configure_trainable()
        pretrained = self.hparams.pretrained
        if pretrained and (Path(pretrained) / ADAPTER_FOLDER).is_dir():  # an A3FTA export: its adapters come back
            adapters = load_adapters(self.denoiser, pretrained)
        else:
            config = self.adapter_config()
            adapters = insert_adapters(
                self.denoiser, tuple(config["targets"]), config["reduction"], config["heads"], config["time_embedding"]
            )
        for adapter in adapters.values():
            adapter.requires_grad_(True)

    def adapter_parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.denoiser.modules() if isinstance(m, TimeAwareAdapter) for p in m.parameters()]

    def param_groups(self) -> list[dict]:
        adapter_ids = {id(p) for p in self.adapter_parameters()}
        others = [p for p in self.trainable_parameters() if id(p) not in adapter_ids]
        return [{"params": others}, {"params": self.adapter_parameters(), "lr": self.hparams.adapter_lr}]

    # --------------------------------------------------------------------------------------------------- export
    def exportable_denoiser(self) -> torch.nn.Module:
        """A copy of the denoiser without adapters: the plain diffusers part of the export."""
        return without_adapters(copy.deepcopy(self.denoiser))

    def save_pretrained(self, path: str | Path, lora_only: bool = False) -> Path:
        """The plain pipeline plus ``a3fta_adapters/`` (weights and config) beside it."""
        path = super().save_pretrained(path, lora_only=lora_only)
        with self.sampling_weights():
            save_adapters(self.denoiser, path, self.adapter_config())
        return path
