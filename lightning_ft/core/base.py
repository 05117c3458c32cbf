"""``DiffusionBase``: the LightningModule every fine-tuning method subclasses.

It owns the components (denoiser, scheduler, optional VAE and text encoder), the trainable set, the noise and
timestep sampling, the prediction target (epsilon / v / sample, from the scheduler config), min-SNR weighting,
noise offset, EMA, the optimizer and LR schedule, sampling (``generate``) and export (``save_pretrained``).

A method overrides a few hooks:

- ``training_loss(batch) -> (loss, logs)``: the objective (default: the plain denoising loss);
- ``sample_timesteps(n)`` and ``timestep_weights(t)``: how timesteps are drawn and weighted;
- ``configure_trainable()``: which parameters train, and any modules the method inserts;
- ``on_fit_start()``: precomputation (memory banks, class images).

Checkpoints hold only the trainable parameters (plus EMA and optimizer state) and restore on top of ``pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler as get_lr_scheduler
from diffusers.training_utils import EMAModel, compute_snr

from lightning_ft.core import pipeline as pipe_utils
from lightning_ft.core.checks import check_model_settings
from lightning_ft.core.class_labels import resolve_null_class
from lightning_ft.core.components import load_components
from lightning_ft.core.encoding_cache import EncodingCache, tensor_key
from lightning_ft.core.noise_process import check_ddpm_scheduler
from lightning_ft.core.resume import check_checkpoint_fits, method_name
from lightning_ft.core.rng import rng_states, set_rng_states
from lightning_ft.core.sampling_export import SamplingExportMixin
from lightning_ft.core.speed import apply_speed_options
from lightning_ft.core.trainable import DEFAULT_LORA_TARGETS, apply_trainable

#: Folders that a method's export writes beside the diffusers weights (modules it inserts), and the method that
#: loads them back; a plain load of such an export would silently be another model.
METHOD_EXPORT_FOLDERS = {"a3fta_adapters": "AdapterAttentionFineTuning", "anl_modules": "ConditionTuning"}


class DiffusionBase(SamplingExportMixin, L.LightningModule):
    """Fine-tune a pretrained diffusion model.

    Args:
        pretrained: local diffusers folder or hub id of the model (default None: build from ``components``).
        components: config dicts that build or override components (see ``lightning_ft.core.components``).
        trainable: ``full`` | ``attention`` | ``lora`` | ``none`` (default ``full``).
        lora_rank, lora_alpha, lora_target_modules, lora_dropout: PEFT LoRA settings for ``trainable='lora'``
            (defaults 4, None = rank, q/k/v/out projections, 0.0).
        train_text_encoder: also train the text encoder (default False).
        lr, betas, weight_decay, adam_eps: AdamW settings (defaults 5e-6, (0.9, 0.999), 1e-2, 1e-8).
        lr_scheduler: diffusers schedule name, ``constant`` | ``constant_with_warmup`` | ``cosine`` | ``linear``
            (default ``constant``); ``warmup_steps`` (default 0).
        prediction_type: override the scheduler's ``epsilon`` / ``v_prediction`` / ``sample`` (default: scheduler's).
        snr_gamma: min-SNR-gamma loss weighting (default None = off; 5.0 is the paper's value).
        noise_offset: offset-noise strength (default 0.0).
        condition_dropout: probability of training a sample with the empty prompt / null class, which teaches the
            unconditional branch that classifier-free guidance needs (default 0.0).
        ema_decay: keep an EMA of the trainable weights, used for sampling and export (default None = off).
        sample_scheduler, sample_scheduler_kwargs: diffusers scheduler class used for sampling and written with the
            export, built from the training scheduler's config (default ``DDIMScheduler``, no overrides).
        sample_steps, guidance_scale: defaults for ``generate`` (25, 3.0).
        null_class: class index used as the unconditional class of a class-conditional model, for condition dropout
            and guidance (default None: the model's own null class, i.e. index ``num_classes`` of a DiT; a UNet
            with ``num_class_embeds`` has none, so give one, or sampling runs without guidance).
        cache_latents: compute the VAE posterior of each distinct training image once (default False).
        cache_text_embeddings: compute the frozen text encoder's output for each distinct prompt once
            (default True; ignored when ``train_text_encoder``).
        attention: attention kernel of the denoiser, ``sdpa`` | ``eager`` (default None: the model's own, which is
            SDPA for diffusers UNets on torch 2).
        channels_last: keep the denoiser's weights in channels-last memory layout (default False).
        gradient_checkpointing: recompute the denoiser's (and a training text encoder's) block activations in the
            backward pass, trading time for memory (default False).
        compile: ``torch.compile`` the denoiser in place (default False; compiles on the first forward).
        backbones: the metric backbones this model is scored with, by role (``identity``, ``fid``, ``prompt``,
            ``condition``: ``{role: {"name": ..., "path": ...}}``, as in a folder's ``lightning_ft.json``; default
            None: what the pretrained folder declares). The monitors' and ANL's ``auto`` read it; exports keep it.
    """

    #: Set True in a subclass that needs ``self.frozen_denoiser`` (the pretrained denoiser, frozen, made once).
    requires_frozen_denoiser: bool = False
    #: The folder of ``METHOD_EXPORT_FOLDERS`` that this class puts back when it loads an export (None: none).
    export_folder: str | None = None

    def __init__(
        self,
        pretrained: str | None = None,
        components: dict | None = None,
        trainable: str = "full",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] = list(DEFAULT_LORA_TARGETS),
        lora_dropout: float = 0.0,
        train_text_encoder: bool = False,
        lr: float = 5e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        adam_eps: float = 1e-8,
        lr_scheduler: str = "constant",
        warmup_steps: int = 0,
        prediction_type: str | None = None,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        condition_dropout: float = 0.0,
        ema_decay: float | None = None,
        sample_scheduler: str = "DDIMScheduler",
        sample_scheduler_kwargs: dict | None = None,
        sample_steps: int = 25,
        guidance_scale: float = 3.0,
        null_class: int | None = None,
        cache_latents: bool = False,
        cache_text_embeddings: bool = True,
        attention: str | None = None,
        channels_last: bool = False,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        backbones: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        # Before any component is loaded: a nonsense value fails in a second, naming its key.
        check_model_settings(self.hparams)
        for folder, owner in METHOD_EXPORT_FOLDERS.items():
            if pretrained and (Path(pretrained) / folder).is_dir() and folder != self.export_folder:
                raise ValueError(
                    f"model.pretrained={pretrained!r} was exported by {owner}: its inserted modules ({folder}/) are "
                    f"part of the model; load it with lightning_ft.methods.{owner}"
                )
        parts = load_components(pretrained, components)
        self.denoiser = parts.denoiser
        self.vae = parts.vae
        self.text_encoder = parts.text_encoder
        self.tokenizer = parts.tokenizer
        # Training always adds noise with a DDPM scheduler of the same config, as diffusers' training scripts do: a
        # pipeline folder ships its *sampling* scheduler (PNDM, DDIM, ...), some of which lack get_velocity. A
        # flow-matching or unknown scheduler is refused first: from_config would accept it and train the wrong thing.
        check_ddpm_scheduler(parts.scheduler, "model.pretrained" if pretrained else "model.components.scheduler")
        self.noise_scheduler = DDPMScheduler.from_config(parts.scheduler.config)
        if prediction_type is not None:
            self.noise_scheduler.register_to_config(prediction_type=prediction_type)
        for frozen in (self.vae, self.text_encoder):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        self.null_class = resolve_null_class(self.denoiser, null_class) if self.conditioning == "class" else None
        self.frozen_denoiser = None
        if self.requires_frozen_denoiser:
            self.frozen_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        self.configure_trainable()
        apply_speed_options(
            self.denoiser,
            self.text_encoder if train_text_encoder else None,
            attention=attention,
            channels_last=channels_last,
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
        )
        # Checkpoints hold only trainable weights; the rest comes from `pretrained` (see on_load_checkpoint).
        self.strict_loading = False
        self.ema = None
        self._ema_global_step = 0
        self.latent_cache = EncodingCache() if cache_latents and self.vae is not None else None
        self.text_cache = EncodingCache() if cache_text_embeddings and not train_text_encoder else None
        # diffusers' and transformers' from_pretrained leave models in eval mode, and Lightning keeps the modes it
        # finds: put the trainable parts in train mode (dropout, a text encoder's gradient checkpointing).
        self.train()

    # ----------------------------------------------------------------------------------------------- components
    @property
    def parts(self) -> pipe_utils.Components:
        return pipe_utils.Components(self.denoiser, self.noise_scheduler, self.vae, self.text_encoder, self.tokenizer)

    @property
    def conditioning(self) -> str:
        return self.parts.conditioning

    def model_identity(self) -> str:
        """A short hash of what defines the pretrained model (path or component configs): keys on-disk caches."""
        h = self.hparams
        spec = {"pretrained": h.pretrained, "components": h.components}

        def folder_files(folder: str) -> list:
            files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
            return [(str(p.relative_to(folder)), p.stat().st_size, int(p.stat().st_mtime)) for p in files]

        if h.pretrained and Path(h.pretrained).exists():
            # A local folder that is overwritten with new weights must not reuse caches made from the old ones.
            spec["files"] = folder_files(h.pretrained)
        # The same holds for a component loaded from its own folder (`components: {vae: {pretrained: PATH}}`).
        for key, entry in sorted((h.components or {}).items()):
            path = entry.get("pretrained") if isinstance(entry, dict) else None
            if path and Path(path).exists():
                spec.setdefault("component_files", {})[key] = folder_files(path)
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def native_resolution(self) -> int:
        """Image side the denoiser was built for: its sample size times the VAE's downsampling factor."""
        size = self.denoiser.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return size * self.vae_scale_factor()

    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def check_resolution(self, resolution: int) -> None:
        """Fail fast, naming ``data.resolution``, when the denoiser cannot take images of that size."""
        native = self.native_resolution()
        blocks = getattr(self.denoiser.config, "block_out_channels", None)
        if blocks is None:  # transformers (DiT) have a fixed positional grid
            if resolution != native:
                raise ValueError(f"data.resolution={resolution} but this model only takes {native}x{native} images")
            return
        multiple = self.vae_scale_factor() * 2 ** (len(blocks) - 1)
        if resolution % multiple:
            raise ValueError(f"data.resolution={resolution} is not a multiple of {multiple}, which this model needs")
        if resolution > 4 * native:
            raise ValueError(
                f"data.resolution={resolution} is over 4x the model's native {native} px; "
                "it would not be fine-tuning the pretrained model any more"
            )

    def configure_trainable(self) -> None:
        """Choose the trainable parameters; methods that insert modules override this and call ``super()``."""
        h = self.hparams
        apply_trainable(self.denoiser, h.trainable, h.lora_rank, h.lora_alpha, h.lora_target_modules, h.lora_dropout)
        if self.text_encoder is not None and h.train_text_encoder:
            self.text_encoder.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts never leave eval mode (dropout off), whatever Lightning does to the module tree.
        for frozen in (self.frozen_denoiser, self.vae):
            if frozen is not None:
                frozen.eval()
        if self.text_encoder is not None and not self.hparams.train_text_encoder:
            self.text_encoder.eval()
        return self

    # ------------------------------------------------------------------------------------------------ encoding
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] to the denoiser's space: VAE latents scaled by ``scaling_factor``, or the pixels.

        With ``cache_latents`` the VAE posterior (mean, std) of each distinct image is computed once; a fresh
        latent is still sampled from it every time, exactly as without the cache. A (CPU) ``generator`` draws
        that latent instead of the global RNG."""
        if self.vae is None:
            return pixel_values

        def posterior(indices: list[int]) -> torch.Tensor:
            with torch.no_grad():
                dist = self.vae.encode(pixel_values[indices].to(self.vae.dtype)).latent_dist
            return torch.stack([dist.mean, dist.std], dim=1)

        if self.latent_cache is not None:
            keys = [tensor_key(image) for image in pixel_values]
            params = self.latent_cache.lookup(keys, posterior)
        else:
            params = posterior(list(range(len(pixel_values))))
        mean, std = params[:, 0], params[:, 1]
        # randn(shape), not randn_like: the latter follows the (view's) strides, so the same seed would draw
        # different latents with and without the cache.
        if generator is None:
            eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        else:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        latents = mean + std * eps
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        # Contiguous: some VAEs return channels-last latents, and diffusers' resnets then take other conv kernels in
        # train and eval mode, so a student and its frozen teacher would differ by ~1e-6 with equal weights.
        return ((latents - shift) * self.vae.config.scaling_factor).to(pixel_values.dtype).contiguous()

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states, tokenised exactly as diffusers' StableDiffusionPipeline does."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        if self.hparams.train_text_encoder:
            context = torch.enable_grad() if self.training else torch.no_grad()
            with context:
                return self.text_encoder(ids)[0]

        def encode(indices: list[int]) -> torch.Tensor:
            with torch.no_grad():
                return self.text_encoder(ids[indices])[0]

        if self.text_cache is None:
            return encode(list(range(len(ids))))
        return self.text_cache.lookup([tuple(row.tolist()) for row in ids], encode)

    def encode_conditions(self, batch: dict, prompts_key: str = "prompts", labels_key: str = "class_labels"):
        """The denoiser's condition for a batch (text embeddings, class labels or None), with condition dropout."""
        p = self.hparams.condition_dropout if self.training else 0.0
        if self.conditioning == "text":
            prompts = list(batch[prompts_key])
            if p > 0:
                drop = torch.rand(len(prompts)) < p
                prompts = ["" if d else s for s, d in zip(prompts, drop.tolist())]
            return self.encode_prompts(prompts)
        if self.conditioning == "class":
            labels = batch[labels_key].to(self.device)
            if p > 0:
                if self.null_class is None:
                    raise ValueError("model.condition_dropout > 0 needs a null class: set model.null_class")
                labels = torch.where(torch.rand(len(labels), device=self.device) < p, self.null_class, labels)
            return labels
        return None

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition, denoiser=None) -> torch.Tensor:
        """Run a denoiser (default ``self.denoiser``) and return its prediction with the input's channel count."""
        denoiser = denoiser if denoiser is not None else self.denoiser
        if self.conditioning == "text":
            out = denoiser(noisy, timesteps, encoder_hidden_states=condition).sample
        elif self.conditioning == "class":
            out = denoiser(noisy, timesteps, class_labels=condition).sample
        else:
            out = denoiser(noisy, timesteps).sample
        # Learned-variance models (DiT, IF) predict 2x channels; the mean part is the first half.
        return out[:, : noisy.shape[1]] if out.shape[1] != noisy.shape[1] else out

    # -------------------------------------------------------------------------------------------------- the loss
    def sample_timesteps(self, n: int) -> torch.Tensor:
        """Training timesteps for ``n`` samples (default uniform over the scheduler's range)."""
        return torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), device=self.device)

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (default: min-SNR-gamma when ``snr_gamma`` is set, else 1)."""
        gamma = self.hparams.snr_gamma
        if gamma is None:
            return torch.ones(len(timesteps), device=timesteps.device)
        snr = compute_snr(self.noise_scheduler, timesteps)
        clipped = snr.clamp(max=gamma)
        kind = self.noise_scheduler.config.prediction_type
        if kind == "v_prediction":
            return clipped / (snr + 1)
        if kind == "sample":  # the paper's weight for an x0 loss is min(SNR, gamma) itself
            return clipped
        return clipped / snr.clamp(min=1e-8)

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, timesteps)
        if kind == "sample":
            return x0
        raise ValueError(f"unsupported prediction_type {kind!r}")

    def make_noise(self, x0: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x0)
        if self.hparams.noise_offset:
            noise = noise + self.hparams.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, device=x0.device)
        return noise

    def diffusion_loss(
        self,
        x0: torch.Tensor,
        condition,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        weighted: bool = True,
    ) -> torch.Tensor:
        """Per-sample denoising loss (shape [B]): MSE to the prediction target, mean over dimensions, times
        ``timestep_weights`` when ``weighted``."""
        timesteps = self.sample_timesteps(x0.shape[0]) if timesteps is None else timesteps
        noise = self.make_noise(x0) if noise is None else noise
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        pred = self.predict(noisy, timesteps, condition)
        target = self.prediction_target(x0, noise, timesteps)
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        return loss * self.timestep_weights(timesteps) if weighted else loss

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective of one batch; returns the loss and a dict of values to log. Default: denoising loss."""
        x0 = self.encode_images(batch["pixel_values"])
        loss = self.diffusion_loss(x0, self.encode_conditions(batch)).mean()
        return loss, {"loss/diffusion": loss.detach()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, logs = self.training_loss(batch)
        if not torch.isfinite(loss):
            # Stop before the update: the weights stay those of the last good step, and the checkpoints already
            # written (last.ckpt included) are left as they are. Every rank sees the same loss under DDP.
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in logs.items())
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at global step {self.global_step} (batch {batch_idx}; "
                f"{parts}): training stopped before this update; the last checkpoint written is the last good one. "
                "Lower model.lr, check the data, or use precision 32 / bf16-mixed instead of 16-mixed."
            )
        batch_size = len(batch["pixel_values"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)
        return loss

    def logs_are_written(self) -> bool:
        """Whether values logged now reach the logger: always outside a trainer, else Lightning's own rule (every
        ``trainer.log_every_n_steps`` steps). For diagnostics that cost something to compute or to log."""
        # Lightning exposes the rule only on the trainer's logger connector (private); without one: True.
        connector = getattr(self._trainer, "_logger_connector", None)
        return connector is None or bool(connector.should_update_logs)

    @torch.no_grad()
    def evaluation_loss(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Denoising loss at fixed timesteps and noise (seeded by the batch index): comparable across checkpoints,
        unlike the training loss whose timesteps are random. Timesteps are stratified over the schedule with an
        offset seeded by the batch index, so that batches of one image do not all score t=0. The VAE latent is drawn
        from the same generator: the global RNG (and with it the training run) is left untouched."""
        generator = torch.Generator().manual_seed(batch_idx)
        x0 = self.encode_images(batch["pixel_values"], generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        total = self.noise_scheduler.config.num_train_timesteps
        offset = torch.rand(1, generator=generator)
        timesteps = ((torch.arange(len(x0)) + offset) * total / len(x0)).long().clamp(max=total - 1).to(x0.device)
        return self.diffusion_loss(x0, self.encode_conditions(batch), timesteps, noise, weighted=False).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.evaluation_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["pixel_values"]))
        return loss

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.evaluation_loss(batch, batch_idx)
        self.log("test/loss", loss, batch_size=len(batch["pixel_values"]))
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Images in [0, 1] for ``batch['prompts']`` (or ``batch['class_labels']``) with ``batch['seeds']``."""
        key = "prompts" if self.conditioning == "text" else "labels"
        conditions = batch.get("prompts") if key == "prompts" else batch.get("class_labels")
        return self.generate(**{key: conditions}, seeds=[int(s) for s in batch["seeds"]])

    # --------------------------------------------------------------------------------------- optimisation, EMA
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; override to give inserted modules their own learning rate."""
        return [{"params": self.trainable_parameters()}]

    def configure_optimizers(self):
        h = self.hparams
        groups = [g for g in self.param_groups() if g["params"]]
        if not groups:
            raise ValueError(f"nothing to train: model.trainable={h.trainable!r} left no parameter with requires_grad")
        optimizer = torch.optim.AdamW(groups, **self._adamw_settings())
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        total = int(total) if total and total != float("inf") else 1
        schedule = get_lr_scheduler(
            h.lr_scheduler, optimizer, num_warmup_steps=h.warmup_steps, num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _adamw_settings(self) -> dict:
        h = self.hparams
        return {"lr": h.lr, "betas": tuple(h.betas), "weight_decay": h.weight_decay, "eps": h.adam_eps}

    def _apply_optimizer_settings(self) -> None:
        """After a resume, put the config's optimizer settings back over the checkpoint's.

        Lightning restores the optimizer's and the LR schedule's state, and with them the learning rate (the
        schedule's ``base_lrs``) and the AdamW settings the checkpoint trained with; the command line must win. The
        schedule's shape comes from this run already (its lambda is rebuilt from this run's ``max_steps``), so the
        learning rate is the new base times the schedule's factor at the resumed step. Unchanged settings give back
        exactly the restored values, which keeps an exact resume exact."""
        if self._trainer is None or not self.trainer.optimizers:
            return
        settings = self._adamw_settings()
        optimizer = self.trainer.optimizers[0]
        wanted = [g.get("lr", settings["lr"]) for g in self.param_groups() if g["params"]]
        for group in optimizer.param_groups:
            group.update({k: v for k, v in settings.items() if k != "lr"})
        for config in self.trainer.lr_scheduler_configs:
            schedule = config.scheduler
            factors = getattr(schedule, "lr_lambdas", None)
            if schedule.optimizer is not optimizer or len(wanted) != len(optimizer.param_groups) or factors is None:
                continue
            schedule.base_lrs = list(wanted)
            for group, base, factor in zip(optimizer.param_groups, wanted, factors):
                group["initial_lr"] = base
                lr = base * factor(schedule.last_epoch)
                if group["lr"] != lr:
                    group["lr"] = lr
            schedule._last_lr = [group["lr"] for group in optimizer.param_groups]

    def on_fit_start(self) -> None:
        if self.hparams.ema_decay is not None and self.ema is None:
            self.ema = EMAModel(self.trainable_parameters(), decay=self.hparams.ema_decay)
        if self.ema is not None:
            self.ema.to(self.device)
        restored = getattr(self, "_restored_ema_step", None)
        self._ema_global_step = restored if restored is not None else self.trainer.global_step

    def on_train_start(self) -> None:
        # After Lightning restored the optimizer and schedule (in fit, before this hook): the config's lr wins.
        if getattr(self, "_resumed", False):
            self._apply_optimizer_settings()
        # A checkpoint is written in on_train_batch_end before this module's own on_train_batch_end applies that
        # step's EMA update: a resumed run applies it now, so the EMA continues exactly as in an unbroken run.
        if self.ema is not None and self._ema_global_step < self.trainer.global_step:
            self.ema.step(self.trainable_parameters())
            self._ema_global_step = self.trainer.global_step
        # Module hooks run after the callbacks' on_train_start (which may sample): the restored stream starts here.
        if getattr(self, "_pending_rng_states", None) is not None:
            set_rng_states(self._pending_rng_states)
            self._pending_rng_states = None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Once per optimizer step, not per micro-batch: with gradient accumulation the weights change only every
        # `accumulate_grad_batches` batches (diffusers steps its EMA under `accelerator.sync_gradients`).
        if self.ema is not None and self.trainer.global_step > self._ema_global_step:
            self._ema_global_step = self.trainer.global_step
            self.ema.step(self.trainable_parameters())

    @contextlib.contextmanager
    def sampling_weights(self):
        """Within this block the module holds the weights used to sample and export (EMA if enabled), in eval."""
        was_training = self.training
        self.eval()
        if self.ema is not None:
            params = self.trainable_parameters()
            self.ema.store(params)
            self.ema.copy_to(params)
        try:
            yield
        finally:
            if self.ema is not None:
                self.ema.restore(params)
            self.train(was_training)

    # --------------------------------------------------------------------------------------------- checkpoints
    def trainable_state_keys(self) -> set[str]:
        """State-dict keys a checkpoint keeps: trainable parameters (frozen weights come from ``pretrained``)."""
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lightning_ft"] = {
            "method": method_name(type(self)),  # a resume into another method is refused (core/resume.py)
            "max_steps": self.trainer.max_steps if self._trainer is not None else None,
            "model_identity": self.model_identity(),
            "trainable_keys": sorted(keep),
            "ema_step": self._ema_global_step,  # the last step whose EMA update is in checkpoint["ema"]
        }
        # Lightning keeps no random state; noise, timesteps and condition dropout draw from the global generators, so
        # a resumed run needs them to continue exactly (restored in on_train_start, after every setup hook).
        checkpoint["rng_states"] = rng_states()
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The CLI has checked this before anything was written; a run started from Python is checked here.
        check_checkpoint_fits(self, checkpoint, "checkpoint")
        self._resumed = True
        self._pending_rng_states = checkpoint.get("rng_states")
        self._restored_ema_step = checkpoint.get("lightning_ft", {}).get("ema_step")
        if "ema" in checkpoint and self.hparams.ema_decay is not None:
            self.ema = EMAModel(self.trainable_parameters(), decay=self.hparams.ema_decay)
            self.ema.load_state_dict(checkpoint["ema"])
            self.ema.decay = self.hparams.ema_decay  # the state dict carries the old decay; the config wins
            self.ema.to(self.device)  # strategies that restore after on_fit_start (FSDP) need the move here
