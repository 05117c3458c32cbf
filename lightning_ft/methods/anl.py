"""ANL condition-based tuning ("Transferring Pretrained Diffusion Probabilistic Models", ICLR 2023 submission;
docs/methods.md, ANL).

The pretrained denoiser stays frozen; semantic tokens of a **condition image** (CLIP image tokens when a CLIP vision
checkpoint is given, the embedded feature network's tokens otherwise) are injected through ANL modules after its
residual blocks (``lightning_ft.nn.anl``), and only those modules (plus a learned null condition) train. In training
the condition image is the target image itself, so the model learns p(x | E(x)); a fraction of samples trains with
the null condition instead, for guidance. Sampling takes condition images and masks a fraction ``mask_rate`` of their
tokens (replaced by the null tokens), which trades fidelity to the condition image for diversity.

What was read: modules = cross-attention fusion + non-linear mapping, inserted hierarchically, only they tune;
masked sampling raises diversity. **Inferred** (docs/methods.md, ANL): one module after every resnet, the layer
layout, zero initialisation, 10% condition dropout to a learned null, the masking mechanism (random token positions
replaced by the null tokens; m = 0.5 by default), lr 1e-4; whether prompts are used at all (here: off by default, the
empty prompt, so the image is the only condition, as for the unconditional DPMs of the paper).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from lightning_ft.core.base import DiffusionBase
from lightning_ft.core.sampling_loop import denoise_loop
from lightning_ft.metrics.backbones import model_backbones
from lightning_ft.nn.anl import (
    ANL_FOLDER,
    ANLModule,
    insert_anl,
    load_anl_weights,
    make_condition_encoder,
    save_anl,
    without_anl,
)


class ConditionTuning(DiffusionBase):
    """Train only ANL modules that inject condition-image tokens into a frozen denoiser; masked sampling.

    Args:
        condition_encoder: ``auto`` (default: the encoder the pretrained folder declares for the ``condition``
            role in its ``lightning_ft.json``, else ``clip``), ``clip`` (CLIP vision tokens; ViT-L/14, the paper's
            setting, by default) or ``package.module:function`` (a factory).
        condition_encoder_path: folder or hub id of the encoder weights (default None: the declared one, or
            ``openai/clip-vit-large-patch14``).
        anl_head_width: channels per attention head of the ANL modules (default 64, inferred).
        image_condition_dropout: probability of training a sample with the null condition tokens (default 0.1).
        mask_rate: default fraction of condition tokens replaced by the null tokens at sampling (default 0.5).
        use_prompts: also give the denoiser the captions (default False: the empty prompt; inferred).
        num_reference_conditions: training images kept as default condition images for ``generate`` and the
            sample logger (default 16; stored with the export).
        lr: learning rate of the ANL modules (default 1e-4, inferred).
        **kwargs: see ``DiffusionBase``; ``trainable`` must stay ``none`` (the denoiser is frozen).
    """

    export_folder = ANL_FOLDER
    trains_controlnets = False  # its modules are the image condition, a ControlNet another

    def __init__(
        self,
        *args,
        trainable: str = "none",
        condition_encoder: str = "auto",
        condition_encoder_path: str | None = None,
        anl_head_width: int = 64,
        image_condition_dropout: float = 0.1,
        mask_rate: float = 0.5,
        use_prompts: bool = False,
        num_reference_conditions: int = 16,
        lr: float = 1e-4,
        **kwargs,
    ):
        if trainable != "none":
            raise ValueError(f"ANL tuning keeps the denoiser frozen: model.trainable must be 'none', not {trainable!r}")
        for name, value in (("image_condition_dropout", image_condition_dropout), ("mask_rate", mask_rate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.{name}={value} must lie in [0, 1]")
        super().__init__(*args, trainable=trainable, lr=lr, **kwargs)

    # ------------------------------------------------------------------------------------------------ modules
    def configure_trainable(self) -> None:
        super().configure_trainable()
        h = self.hparams
        # Before the condition encoder is loaded (a download, or a hub error offline): a DiT fails on what matters.
        if not any(isinstance(m, ResnetBlock2D) for m in self.denoiser.modules()):
            raise ValueError(
                "ANL: the denoiser has no diffusers ResnetBlock2D to insert modules after (a UNet is needed)"
            )
        declared = model_backbones(self)
        self.condition_encoder = make_condition_encoder(h.condition_encoder, h.condition_encoder_path, declared)
        resolution = self.native_resolution()
        with torch.no_grad():
            probe = self.condition_encoder(torch.zeros(1, 3, resolution, resolution))
        self.null_tokens = nn.Parameter(torch.zeros(probe.shape[1], probe.shape[2]))
        modules, self.condition_context = insert_anl(self.denoiser, probe.shape[2], h.anl_head_width)
        for module in modules.values():
            module.requires_grad_(True)
        self.register_buffer("reference_conditions", torch.zeros(0, 3, resolution, resolution), persistent=False)
        if h.pretrained and (Path(h.pretrained) / ANL_FOLDER).is_dir():  # an ANL export: its modules come back
            self._load_export(Path(h.pretrained))

    def _load_export(self, folder: Path) -> None:
        config = json.loads((folder / ANL_FOLDER / "config.json").read_text())
        ours = self.anl_config()
        for key in ("condition_encoder", "condition_encoder_path", "anl_head_width"):
            if config.get(key) != ours[key]:
                raise ValueError(
                    f"model.{key}={ours[key]!r} but the export {str(folder)!r} was trained with {config.get(key)!r}"
                )
        null, references = load_anl_weights(self.denoiser, folder)
        with torch.no_grad():
            self.null_tokens.copy_(null)
        if references is not None:
            self.reference_conditions = references

    def anl_config(self) -> dict:
        h = self.hparams
        keys = ("condition_encoder", "condition_encoder_path", "anl_head_width", "use_prompts", "mask_rate")
        return {k: h[k] for k in keys}

    def anl_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.denoiser.modules() if isinstance(m, ANLModule) for p in m.parameters()]

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "condition_encoder"):
            self.condition_encoder.eval()  # frozen, whatever Lightning does to the module tree
        return self

    # ---------------------------------------------------------------------------------------------- conditions
    @torch.no_grad()
    def condition_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, D) of condition images in [-1, 1] from the frozen encoder."""
        return self.condition_encoder(images.to(self.device))

    def base_condition(self, n: int, prompts: Sequence[str] | None = None, labels=None, null: bool = False):
        """The denoiser's own condition: the prompts (``use_prompts``) or the empty prompt; labels or the null class
        (the family's null condition)."""
        if null:
            return self.null_condition(n)
        offered = prompts if self.hparams.use_prompts else None
        inputs = self.family.sample_inputs(offered, labels, n, required=False)
        return self.encode_inputs(self.family.raw_inputs(inputs)) if inputs.conditional else self.null_condition(n)

    def encode_conditions(self, batch: dict, prompts_key: str = "prompts", labels_key: str = "class_labels"):
        """The denoiser's condition plus the condition tokens of the batch's own images (field ``anl_tokens``),
        with condition dropout in training."""
        n = len(batch["pixel_values"])
        if not self.hparams.use_prompts and prompts_key in batch:  # the empty prompt (only text families read it)
            batch = {**batch, prompts_key: [""] * n}
        base = super().encode_conditions(batch, prompts_key, labels_key)
        tokens = self.condition_tokens(batch["pixel_values"])
        p = self.hparams.image_condition_dropout if self.training else 0.0
        if p > 0:
            drop = (torch.rand(n, device=tokens.device) < p)[:, None, None]
            tokens = torch.where(drop, self.null_tokens.to(tokens.dtype).expand_as(tokens), tokens)
        return base.replace(anl_tokens=tokens)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition, denoiser=None) -> torch.Tensor:
        """The denoiser's prediction with the condition's ``anl_tokens`` handed to the ANL modules."""
        self.condition_context.tokens = condition.get("anl_tokens")
        try:
            return super().predict(noisy, timesteps, condition.replace(anl_tokens=None), denoiser)
        finally:
            self.condition_context.tokens = None

    def mask_tokens(self, tokens: torch.Tensor, mask_rate: float, seeds: Sequence[int]) -> torch.Tensor:
        """Replace ``round(mask_rate * L)`` token positions of each sample by the null tokens; the positions are
        drawn from the sample's seed, so a sample depends on its seed only."""
        count = round(mask_rate * tokens.shape[1])
        if count == 0:
            return tokens
        masked = tokens.clone()
        null = self.null_tokens.to(tokens.dtype)
        for i, seed in enumerate(seeds):
            positions = torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(int(seed) + 7919))
            masked[i, positions[:count]] = null[positions[:count]]
        return masked

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dataset = getattr(self.trainer.datamodule, "dataset", None)
        if dataset is not None and len(self.reference_conditions) == 0:
            count = min(self.hparams.num_reference_conditions, len(getattr(dataset, "images", dataset)))
            self.reference_conditions = torch.stack([dataset[i]["pixel_values"] for i in range(count)]).to(self.device)

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | None = None,
        labels: Sequence[int] | None = None,
        seeds: Sequence[int] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 32,
        negative_prompt: str | None = None,
        condition_images: torch.Tensor | None = None,
        mask_rate: float | None = None,
    ) -> torch.Tensor:
        """Images in [0, 1] from condition images (N, 3, H, W) in [-1, 1] (default: the reference conditions, one
        per sample, cycled), with ``mask_rate`` of their tokens masked and guidance against the null condition."""
        mask_rate = self.hparams.mask_rate if mask_rate is None else mask_rate
        if condition_images is None:
            if len(self.reference_conditions) == 0:
                raise ValueError("ConditionTuning.generate needs condition_images (no reference conditions yet)")
            n = len(seeds) if seeds is not None else len(prompts or labels or self.reference_conditions)
            index = [i % len(self.reference_conditions) for i in range(n)]
            condition_images = self.reference_conditions[index]
        steps, guidance, seeds = self.sampling_settings(len(condition_images), seeds, steps, guidance_scale)
        chunks = []
        with self.sampling_weights():
            scheduler = self.exported_scheduler()
            for start in range(0, len(seeds), batch_size):
                part = slice(start, start + batch_size)
                k = len(seeds[part])
                tokens = self.mask_tokens(self.condition_tokens(condition_images[part]), mask_rate, seeds[part])
                base = self.base_condition(k, prompts[part] if prompts else None, labels[part] if labels else None)
                cond = base.replace(anl_tokens=tokens)
                uncond = self.base_condition(k, null=True).replace(anl_tokens=self.null_tokens.expand_as(tokens))

                def model_output(x, t, cond=cond, uncond=uncond):
                    out = self.predict(x, t, cond)
                    if guidance == 1.0:
                        return out
                    base = self.predict(x, t, uncond)
                    return base + guidance * (out - base)

                chunks.append(denoise_loop(self.parts, scheduler, seeds[part], steps, model_output))
        return torch.cat(chunks).cpu()

    # --------------------------------------------------------------------------------------------------- export
    def exportable_denoiser(self) -> torch.nn.Module:
        return without_anl(copy.deepcopy(self.denoiser))

    def save_pretrained(self, path: str | Path, lora_only: bool = False) -> Path:
        """The plain pipeline plus ``anl_modules/`` (modules, null tokens, reference conditions, config)."""
        path = super().save_pretrained(path, lora_only=lora_only)
        with self.sampling_weights():
            save_anl(self.denoiser, self.null_tokens, self.reference_conditions, path, self.anl_config())
        return path
