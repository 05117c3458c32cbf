"""Diff-Tuning: transfer a diffusion model along its "chain of forgetting" (docs/methods.md, Diff-Tuning).

The pretrained model stays a good denoiser near the data (small t) but transfers poorly at high noise, so
fine-tuning *retains* pretrained knowledge at small t, by replaying images the pretrained model sampled before
training (the memory bank), and *reconsolidates* mainly at large t on the target data:

    L = E_{x0 ~ target, t ~ p_psi} l(theta; x0, t, c) + retention_weight * E_{x0 ~ bank, t ~ p_xi} l(theta; x0, t, null)
    p_psi(t) ∝ (t + 1)^a (favours the noisy end),   p_xi(t) ∝ (T - t)^b (favours the clean end).

Released (official training script): the two losses and their weight 0.1; memory images = ``int(batch * 0.2)`` of
each batch and the target images the rest, both in one forward; t drawn from the two categorical distributions
above (importance sampling, not loss weights) with b = a = 1 unless b is set; memory images always get the null
condition (their labels are discarded); the bank is sampled from the pretrained model before fine-tuning; all
weights train with AdamW lr 1e-4, weight decay 0.

Inferred (not read in code or paper):
- the bank size (``memory_size`` 256 here; the paper's value was not read) and its sampler settings;
- the empty prompt as the bank's prompt for text-to-image models (the released model is class-conditional and
  samples every class);
- ``weighting='loss_weight'``: uniform t with per-sample weights p(t) * T (mean 1 over uniform t), equal in
  expectation to importance sampling;
- at least one memory image per batch when ``memory_ratio > 0``; memory drawn uniformly without replacement per
  step from a generator seeded by the step (the released loader cycles a shuffled bank); memory images flipped with
  probability 0.5 as the released loader's transform does (``memory_flip``);
- the per-sample loss is the base denoising MSE (the released DiT also adds a VLB term for its learned variance).

With a ControlNet (``trainable: controlnet``; the paper's second experiment, whose code is not released, so all of
this is inferred): the two losses train the ControlNet beside the frozen denoiser; the bank is sampled by the
pretrained model without the ControlNet (at initialisation ``ControlNetModel.from_unet``'s zero convolutions make
the two the same); memory images get the null prompt and, as control, a black image (``memory_control='empty'``)
or the batch's own control images (``'paired'``).

Masked training (batches with loss masks, ``data.mask_dir`` / ``data.alpha_mask``): the target images are masked;
the memory images, the pretrained model's own samples, are retained everywhere (their mask is ones).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lightning_ft.core.base import DiffusionBase
from lightning_ft.core.conditions import Condition
from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.data.memory_bank import generate_memory_bank, load_memory_bank, memory_bank_folder

WEIGHTINGS = ("sampling", "loss_weight")
#: With a ControlNet (``trainable: controlnet``), what the memory images are trained with as control (inferred):
#: ``empty`` (a black image) or ``paired`` (the batch's own control images, cycled).
MEMORY_CONTROLS = ("empty", "paired")


def power_law_pmf(T: int, power: float, decreasing: bool = False) -> torch.Tensor:
    """Exact pmf over t in {0..T-1} (float64): ∝ (t+1)^power, or ∝ (T-t)^power when ``decreasing``."""
    support = torch.arange(T, dtype=torch.float64)
    base = T - support if decreasing else support + 1
    log_weights = power * base.log()
    # Normalising in log space keeps large powers from overflowing.
    return torch.softmax(log_weights, dim=0)


def power_law_timesteps(
    n: int,
    T: int,
    power: float,
    decreasing: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` timesteps drawn i.i.d. from ``power_law_pmf(T, power, decreasing)`` (power 0 is uniform)."""
    pmf = power_law_pmf(T, power, decreasing)
    return torch.multinomial(pmf, n, replacement=True, generator=generator).to(device)


class DiffTuning(DiffusionBase):
    """Diff-Tuning: reconsolidation on the target data + retention on a bank of pretrained-model samples.

    Args:
        memory_size: images in the memory bank, sampled from the pretrained model before training (default 256,
            inferred).
        memory_ratio: fraction of each batch that is memory: ``int(batch * ratio)`` memory images (at least 1 when
            ratio > 0) replace the last target images of the datamodule's batch, so ``data.batch_size`` is the
            whole step's batch as in the released ``--global-batch-size`` (default 0.2, released). A batch of one
            image keeps it and adds one memory image. 0 turns retention off.
        retention_weight: weight of the retention loss (default 0.1, released).
        target_power: a in p(t) ∝ (t+1)^a for target images (default 1.0, released).
        memory_power: b in p(t) ∝ (T-t)^b for memory images (default None = a, as the released -1 default).
        weighting: ``sampling`` (draw t from the distributions, released) or ``loss_weight`` (uniform t, per-sample
            weights p(t) * T with mean 1, inferred) (default ``sampling``).
        memory_prompts: prompts the bank is sampled with, cycled over the images (default None = the empty prompt,
            i.e. unconditional samples, for text models; class models cycle over their classes).
        memory_sample_steps, memory_guidance_scale: sampler settings of the bank (defaults 25, 1.0).
        memory_cache_dir: folder of cached banks (default None: ``memory_bank`` under the project cache).
        memory_flip: flip each drawn memory image horizontally with probability 0.5 (default True: released, its
            memory loader reuses the target transform's ``RandomHorizontalFlip``; measured in
            ``benchmarks/results/released_parity.md``). The results tables were measured before this setting existed,
            without flips: their experiment files set it false.
        memory_control: with a ControlNet (``trainable: controlnet``; inferred, see the module docstring): the
            control image the memory images are trained with: ``empty`` (black: the base model's behaviour without
            a control is kept; default) or ``paired`` (the batch's own control images, cycled).
        **kwargs: see ``DiffusionBase``.
    """

    def __init__(
        self,
        *args,
        memory_size: int = 256,
        memory_ratio: float = 0.2,
        retention_weight: float = 0.1,
        target_power: float = 1.0,
        memory_power: float | None = None,
        weighting: str = "sampling",
        memory_prompts: list[str] | None = None,
        memory_sample_steps: int = 25,
        memory_guidance_scale: float = 1.0,
        memory_cache_dir: str | None = None,
        memory_control: str = "empty",
        memory_flip: bool = True,
        **kwargs,
    ):
        if memory_control not in MEMORY_CONTROLS:
            raise ValueError(f"model.memory_control={memory_control!r} is not one of {MEMORY_CONTROLS}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"model.weighting={weighting!r} is not one of {WEIGHTINGS}")
        if not 0.0 <= memory_ratio < 1.0:
            raise ValueError(f"model.memory_ratio={memory_ratio} must be in [0, 1)")
        if memory_ratio > 0 and memory_size < 1:
            raise ValueError(f"model.memory_size={memory_size} must be positive when memory_ratio > 0")
        if retention_weight < 0:
            raise ValueError(f"model.retention_weight={retention_weight} must be >= 0")
        super().__init__(*args, **kwargs)
        h = self.hparams
        if h.memory_ratio > 0:
            try:  # memory images train the unconditional branch: the family's null input must exist
                self.family.null_inputs(1)
            except ValueError as error:
                raise ValueError(f"Diff-Tuning trains memory images with the null condition: {error}") from None
        self.family.retention_inputs(1, memory_prompts)  # refuses memory_prompts on a model not asked with prompts
        T = self.noise_process.num_train_timesteps
        b = target_power if memory_power is None else memory_power
        # Plain attributes, not buffers: they are derived from hparams and must not enter checkpoints.
        self.target_pmf = power_law_pmf(T, target_power, decreasing=False)
        self.memory_pmf = power_law_pmf(T, b, decreasing=True)
        self.memory_bank: torch.Tensor | None = None  # uint8 (N, 3, H, W), loaded in setup
        self._batch_idx = 0

    # ----------------------------------------------------------------------------------------------- timesteps
    def _draw(self, pmf: torch.Tensor, n: int) -> torch.Tensor:
        if self.hparams.weighting == "sampling":
            return torch.multinomial(pmf, n, replacement=True).to(self.device)
        return super().sample_timesteps(n)

    def sample_timesteps(self, n: int) -> torch.Tensor:
        """Target timesteps: p(t) ∝ (t+1)^a with ``weighting='sampling'``, else uniform."""
        return self._draw(self.target_pmf, n)

    def memory_timesteps(self, n: int) -> torch.Tensor:
        """Memory timesteps: p(t) ∝ (T-t)^b with ``weighting='sampling'``, else uniform."""
        return self._draw(self.memory_pmf, n)

    def importance_weights(self, timesteps: torch.Tensor, memory: bool = False) -> torch.Tensor:
        """Per-sample weights of the ``loss_weight`` option, p(t) * T (mean 1 over uniform t); 1 for ``sampling``."""
        if self.hparams.weighting == "sampling":
            return torch.ones(len(timesteps), device=timesteps.device)
        pmf = self.memory_pmf if memory else self.target_pmf
        return (pmf[timesteps.cpu()] * len(pmf)).to(timesteps.device, torch.float32)

    # --------------------------------------------------------------------------------------------- memory bank
    def memory_count(self, batch_size: int) -> int:
        """Memory images in a step whose datamodule batch holds ``batch_size`` images (released int arithmetic)."""
        if self.hparams.memory_ratio <= 0:
            return 0
        return max(1, int(batch_size * self.hparams.memory_ratio))

    def memory_inputs(self) -> SampleInputs:
        """What the bank's images are sampled with, one per image (the family's ``retention_inputs``)."""
        return self.family.retention_inputs(self.hparams.memory_size, self.hparams.memory_prompts)

    def memory_bank_folder(self) -> Path:
        h = self.hparams
        inputs = self.memory_inputs()
        sampler = {
            "scheduler": h.sample_scheduler,
            "scheduler_kwargs": h.sample_scheduler_kwargs,
            "steps": h.memory_sample_steps,
            "guidance_scale": h.memory_guidance_scale,
        }
        root = Path(h.memory_cache_dir) if h.memory_cache_dir else None
        conditions = inputs.values() if inputs.conditional else None
        return memory_bank_folder(
            self.model_identity(), conditions, h.memory_size, self.native_resolution(), sampler, root=root
        )

    def prepare_memory_bank(self) -> torch.Tensor:
        """Sample the bank if it is not cached (split across the ranks), then load it on every rank. The bank is
        sampled at the training data's resolution (``data.resolution``, the largest of several; without a data module,
        the model's own)."""
        h = self.hparams
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        side = getattr(datamodule, "sampling_resolution", None)
        if side is None:
            side = dict(getattr(datamodule, "hparams", None) or {}).get("resolution")
        # The pretrained model's samples: without a ControlNet (at initialisation it changes nothing anyway).
        with self.sampling_at(side), self.without_controlnet():
            folder = self.memory_bank_folder()
            if trainer is not None:
                self.to(trainer.strategy.root_device)  # setup runs before the strategy moves the model
            generate_memory_bank(
                self, folder, self.memory_inputs(), h.memory_sample_steps, h.memory_guidance_scale, trainer=trainer
            )
        self.memory_bank = load_memory_bank(folder)
        return self.memory_bank

    def setup(self, stage: str) -> None:
        # The bank is sampled here and not in on_fit_start: setup runs before a resumed checkpoint's weights are
        # loaded, so a bank missing on resume is still sampled from the pretrained model, not the fine-tuned one.
        if stage == "fit" and self.hparams.memory_ratio > 0 and self.memory_bank is None:
            self.prepare_memory_bank()

    def draw_memory(self, k: int, size: tuple[int, int]) -> torch.Tensor:
        """``k`` bank images in [-1, 1] at ``size``, uniformly without replacement, seeded by the step (and the
        micro-batch and rank, so accumulated batches and DDP ranks do not replay the same images)."""
        if self.memory_bank is None:
            self.prepare_memory_bank()
        seed = np.random.SeedSequence([int(self.global_step), self._batch_idx, self.global_rank]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        n = len(self.memory_bank)
        if k <= n:
            index = torch.randperm(n, generator=generator)[:k]
        else:
            index = torch.randint(0, n, (k,), generator=generator)
        images = self.memory_bank[index].float() / 127.5 - 1.0
        if self.hparams.memory_flip:  # the released memory loader's RandomHorizontalFlip, from the same generator
            flipped = torch.rand(len(images), generator=generator) < 0.5
            images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
        if tuple(images.shape[-2:]) != tuple(size):
            # The bank is square, at the data's (largest) resolution; a batch may be smaller or an aspect bucket:
            # resize with the aspect kept until the bank images cover it, then centre-crop (never stretched).
            height, width = images.shape[-2:]
            scale = max(size[0] / height, size[1] / width)
            covered = (max(size[0], round(height * scale)), max(size[1], round(width * scale)))
            if covered != (height, width):
                images = F.interpolate(images, size=covered, mode="bilinear", antialias=True, align_corners=False)
            top, left = (covered[0] - size[0]) // 2, (covered[1] - size[1]) // 2
            images = images[..., top : top + size[0], left : left + size[1]]
        return images.to(self.device)

    # ---------------------------------------------------------------------------------------------------- loss
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pixels = batch["pixel_values"]
        size = len(pixels)
        k = self.memory_count(size)
        n = max(1, size - k)
        target = {key: value[:n] if _is_per_sample(value, size) else value for key, value in batch.items()}
        t_target = self.sample_timesteps(n)
        condition = self.encode_conditions(target)
        mask = self.loss_mask(target)  # the target rows' masks (sliced with them above), or None
        if k == 0:
            x0 = self.encode_images(target["pixel_values"], keys=self.image_keys(target))
            per_sample = self.diffusion_loss(x0, condition, t_target, **self.mask_argument(mask))
            per_sample = per_sample * self.importance_weights(t_target)
            loss = per_sample.mean()
            return loss, {"loss/reconsolidation": loss.detach()}
        memory = self.draw_memory(k, tuple(pixels.shape[-2:])).to(pixels.dtype)
        t_memory = self.memory_timesteps(k)
        # One forward for both parts, as the released script does.
        x0 = self.encode_images(torch.cat([target["pixel_values"], memory]))
        # Memory images are trained with the null condition (released), at this batch's image size.
        memory_condition = self.null_condition(k, tuple(pixels.shape[-2:]))
        if "controlnet_cond" in condition:  # a ControlNet's memory rows need a control image too (inferred)
            controls = target["control_values"]
            if self.hparams.memory_control == "paired":
                memory_controls = controls[torch.arange(k) % len(controls)]
            else:
                memory_controls = torch.zeros_like(controls[:1]).expand(k, -1, -1, -1)
            memory_condition = self.with_control(memory_condition, memory_controls)
        condition = Condition.cat([condition, memory_condition])
        timesteps = torch.cat([t_target, t_memory])
        weights = torch.cat([self.importance_weights(t_target), self.importance_weights(t_memory, memory=True)])
        if mask is not None:  # memory images are the pretrained model's samples, retained everywhere: unmasked
            mask = torch.cat([mask, self.loss_mask({"pixel_values": memory}, fill=True)])
        per_sample = self.diffusion_loss(x0, condition, timesteps, **self.mask_argument(mask)) * weights
        reconsolidation, retention = per_sample[:n].mean(), per_sample[n:].mean()
        loss = reconsolidation + self.hparams.retention_weight * retention
        return loss, {"loss/reconsolidation": reconsolidation.detach(), "loss/retention": retention.detach()}


def _is_per_sample(value, size: int) -> bool:
    return isinstance(value, (torch.Tensor, list, tuple)) and len(value) == size
