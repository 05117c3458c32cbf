"""``DiffusionBase``: the LightningModule every fine-tuning method subclasses.

It is the glue between Lightning and the parts that know the model:

- the **model family** (``self.family``, ``lightning_ft.core.families``): components, conditions, the denoiser call,
  the pipeline that samples and exports, LoRA files;
- the **noise process** (``self.noise_process``, ``lightning_ft.core.noise_process``): timesteps, noise, target;
- ``core/encoding.py`` (images, conditions, the null condition, ``predict``), ``core/objective.py`` (the loss),
  ``core/optimization.py`` (AdamW, schedule), ``core/ema_resume.py`` (EMA, checkpoints, exact resume) and
  ``core/sampling_export.py`` (``generate``, ``save_pretrained``).

A method overrides a few hooks:

- ``training_loss(batch) -> (loss, logs)``: the objective (default: the plain denoising loss);
- ``sample_timesteps(n)`` and ``timestep_weights(t)``: how timesteps are drawn and weighted;
- ``configure_trainable()``: which parameters train, and any modules the method inserts;
- ``on_fit_start()`` / ``setup()``: precomputation (memory banks, class images).

A method that inserts modules saved beside the diffusers weights sets ``export_folder``: it is registered in
``EXPORT_FOLDERS``, so that any other class refuses to load such an export as a plain model.

Checkpoints hold only the trainable parameters (plus EMA and optimizer state) and restore on top of ``pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path

import lightning as L
import torch

from lightning_ft.core.checks import check_model_settings
from lightning_ft.core.components import Components, load_components, pipeline_class_of
from lightning_ft.core.ema_resume import EMAResumeMixin
from lightning_ft.core.encoding import EncodingMixin, decide_latent_cache
from lightning_ft.core.encoding_cache import EncodingCache
from lightning_ft.core.families import REGISTRY, family_class, family_for_pipeline, make_family
from lightning_ft.core.noise_process import noise_process_for, process_kind
from lightning_ft.core.objective import ObjectiveMixin
from lightning_ft.core.optimization import OptimizationMixin
from lightning_ft.core.quantize import check_fit as check_quantized_fit
from lightning_ft.core.quantize import lora_over_quantized, quantize_frozen_parts
from lightning_ft.core.sampling_export import SamplingExportMixin
from lightning_ft.core.speed import apply_speed_options
from lightning_ft.core.trainable import apply_trainable

#: Folders that a method's export writes beside the diffusers weights (modules it inserts) -> the class that loads
#: them back; filled by the classes themselves (``export_folder``). A plain load of such an export would silently
#: be another model.
EXPORT_FOLDERS: dict[str, str] = {}


class DiffusionBase(
    EncodingMixin, ObjectiveMixin, OptimizationMixin, EMAResumeMixin, SamplingExportMixin, L.LightningModule
):
    """Fine-tune a pretrained diffusion model.

    Args:
        pretrained: local diffusers folder or hub id of the model (default None: build from ``components``).
        components: config dicts that build or override components (see ``lightning_ft.core.components``).
        trainable: ``full`` | ``attention`` | ``lora`` | ``none`` | ``controlnet`` (default ``full``). ``controlnet``
            trains a ControlNet beside the frozen denoiser (diffusers' ``train_controlnet.py``; SD and SDXL
            families): batches carry control images (``data.control_dir``), samples are asked with them.
        lora_rank, lora_alpha, lora_target_modules, lora_dropout: PEFT LoRA settings for ``trainable='lora'``
            (defaults 4, None = rank, None = the family's default targets (the attention q/k/v/out projections of
            UNets and DiTs), 0.0).
        lora_variant: the PEFT method that ``trainable='lora'`` trains: ``lora`` | ``dora`` | ``loha`` | ``lokr`` |
            ``oft`` (default ``lora``), built from the settings above as ``lightning_ft.core.trainable.adapter_config``
            maps them (OFT: ``lora_rank`` = blocks per layer, no ``lora_alpha``). The LoRA-only export of ``loha``,
            ``lokr`` and ``oft`` is a PEFT adapter folder (diffusers' ``load_lora_weights`` reads LoRA and DoRA only).
        train_text_encoder: also train the text encoders (every one: SDXL's two) (default False).
        lr, betas, weight_decay, adam_eps: AdamW settings (defaults 5e-6, (0.9, 0.999), 1e-2, 1e-8).
        lr_scheduler: diffusers schedule name, ``constant`` | ``constant_with_warmup`` | ``cosine`` | ``linear``
            (default ``constant``); ``warmup_steps`` (default 0).
        prediction_type: override the scheduler's ``epsilon`` / ``v_prediction`` / ``sample`` (default: scheduler's;
            DDPM models only: a flow-matching model predicts eps - x0).
        timestep_density: how training timesteps are drawn: ``uniform`` | ``logit_normal`` | ``mode`` (the last two
            for flow matching, SD3 paper; default None: the family's, diffusers' script default: ``logit_normal``
            for SD3, ``uniform`` otherwise); ``logit_mean``, ``logit_std``, ``mode_scale`` (0.0, None = the
            family's: 1.0, Ideogram 4's 1.5, 1.29).
        loss_weighting: flow-matching loss weight ``none`` | ``sigma_sqrt`` | ``cosmap`` (default ``none``).
        flow_shift: flow-matching sigma shift (default None: the scheduler's fixed ``shift``, or its
            resolution-dependent shift with ``use_dynamic_shifting``, as its pipelines sample).
        snr_gamma: min-SNR-gamma loss weighting (default None = off; 5.0 is the paper's value).
        noise_offset: offset-noise strength (default 0.0).
        condition_dropout: probability of training a sample with the empty prompt / null class, which teaches the
            unconditional branch that classifier-free guidance needs (default 0.0).
        ema_decay: keep an EMA of the trainable weights, used for sampling and export (default None = off);
            ``ema_offload`` keeps it on the CPU between updates (default False), for models whose EMA copy does not
            fit beside them on the accelerator.
        frozen_dtype: ``bfloat16`` | ``float16``: hold the frozen parts (VAE, text encoders, a method's frozen
            teacher) in that dtype, as diffusers' scripts hold them under ``--mixed_precision`` (default None: as
            loaded). Their outputs are cast to the denoiser's dtype; exports write them in that dtype.
        quantize: ``none`` | ``int8`` | ``nf4`` | ``fp8``: hold the frozen base's linear weights (the denoiser under
            the LoRA, a method's frozen teacher, the frozen text encoders) quantised with torchao, QLoRA-style; needs
            ``trainable='lora'`` and the ``quant`` extra. Exports write the LoRA only (``core/quantize.py``)
            (default ``none``).
        sample_scheduler, sample_scheduler_kwargs: diffusers scheduler class used for sampling and written with the
            export, built from the training scheduler's config (default None: ``DDIMScheduler`` for DDPM models,
            the model's own scheduler for flow-matching models; no overrides).
        sample_steps, guidance_scale: defaults for ``generate`` (25, 3.0).
        null_class: class index used as the unconditional class of a class-conditional model, for condition dropout
            and guidance (default None: the model's own null class, i.e. index ``num_classes`` of a DiT; a UNet
            with ``num_class_embeds`` has none, so give one, or sampling runs without guidance).
        cache_latents: compute the VAE posterior of each distinct training image once; a fresh latent is still
            drawn from it every step, so the loss is the same as without it (default None = auto: on when the data
            module's augmentation gives at most ``LATENT_CACHE_VIEWS_PER_IMAGE`` distinct views of each image, e.g. a
            centre crop with or without flips; decided and printed at fit start; the VAE is always frozen).
        cache_text_embeddings: compute the frozen text encoder's output for each distinct prompt once
            (default True; ignored when ``train_text_encoder``).
        fused_adamw: use torch's fused AdamW kernel (one kernel for every parameter, same math up to floating-point
            order) (default None = auto: on when every trainable parameter is a floating-point tensor on a device
            torch has the kernel for (CPU, CUDA, MPS), else torch's default implementation).
        attention: attention kernel of the denoiser, ``sdpa`` | ``eager`` (default None: the model's own, which is
            SDPA for diffusers UNets on torch 2).
        channels_last: keep the denoiser's weights in channels-last memory layout (default False).
        gradient_checkpointing: recompute the denoiser's (and a training text encoder's) block activations in the
            backward pass, trading time for memory (default False).
        compile: ``torch.compile`` the denoiser in place (default False; compiles on the first forward).
        family: the model family (``stable_diffusion``, ``sdxl``, ``sd3``, ``flux``, ``pixart_sigma``,
            ``class_conditional``, ``unconditional``; default None: read from the folder's ``model_index.json``, or
            recognised from the components).
        sample_resolution: side of the images the model generates and of its memory banks and class images
            (default None: the model's native side; give it for a model whose config has no sample size, e.g.
            Flux, whose pipeline default is 1024).
        max_sequence_length: T5 tokens of the context of SD3, Flux and PixArt (default None: the pipeline's
            default, 256 / 512 / 300). Another length is recorded in the export's ``lightning_ft.json``
            (``pipeline_call``), since the pipeline must be called with it to sample the model as it was trained.
        precondition_outputs: flow matching: score the x0 the prediction implies against x0 (the flow loss times
            sigma^2), as diffusers' SD3 DreamBooth scripts do by default (``--precondition_outputs 1``) (default None:
            the family's, True for SD3 as its scripts, False for the other flow families as theirs).
        backbones: the metric backbones this model is scored with, by role (``identity``, ``fid``, ``prompt``,
            ``condition``: ``{role: {"name": ..., "path": ...}}``, as in a folder's ``lightning_ft.json``; default
            None: what the pretrained folder declares). The monitors' and ANL's ``auto`` read it; exports keep it.
        unmasked_weight: masked training (batches with loss masks: ``data.mask_dir`` / ``data.alpha_mask``): the
            loss weight of masked-out pixels, the mask becoming ``w + (1 - w) * mask`` (OneTrainer's name), in [0, 1]
            (default 0.0: they add nothing, as kohya's sd-scripts). Without masks in the batch it does nothing.
        masked_loss_normalize: masked training: divide each image's loss by its mean mask weight, so that a small
            mask is not down-weighted against a large one (OneTrainer's ``normalize_masked_area_loss``) (default
            False: kohya's plain mean over the image, an image half masked out adds about half the loss).
        controlnet: with ``trainable='controlnet'``, a ControlNet folder to start from (diffusers'
            ``--controlnet_model_name_or_path``; default None: ``ControlNetModel.from_unet`` of the denoiser).
        controlnet_conditioning_scale: the ControlNet residuals' scale when sampling (the pipelines' argument;
            default 1.0); training uses 1, as diffusers' scripts.
        guess_mode: the ControlNet pipelines' ``guess_mode`` when sampling (default False).
    """

    #: Set True in a subclass that needs ``self.frozen_denoiser`` (the pretrained denoiser, frozen, made once).
    requires_frozen_denoiser: bool = False
    #: False in a subclass whose objective does not apply to a ControlNet (``trainable: controlnet`` refused).
    trains_controlnets: bool = True
    #: The folder of inserted modules this class writes with its exports and puts back when it loads one (None:
    #: none); registered in ``EXPORT_FOLDERS`` by the class that sets it.
    export_folder: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        folder = cls.__dict__.get("export_folder")
        if folder:
            EXPORT_FOLDERS.setdefault(folder, cls.__name__)

    def __init__(
        self,
        pretrained: str | None = None,
        components: dict | None = None,
        trainable: str = "full",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
        lora_dropout: float = 0.0,
        lora_variant: str = "lora",
        train_text_encoder: bool = False,
        lr: float = 5e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-2,
        adam_eps: float = 1e-8,
        lr_scheduler: str = "constant",
        warmup_steps: int = 0,
        prediction_type: str | None = None,
        timestep_density: str | None = None,
        logit_mean: float = 0.0,
        logit_std: float | None = None,
        mode_scale: float = 1.29,
        loss_weighting: str = "none",
        flow_shift: float | None = None,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        condition_dropout: float = 0.0,
        ema_decay: float | None = None,
        ema_offload: bool = False,
        frozen_dtype: str | None = None,
        quantize: str = "none",
        sample_scheduler: str | None = None,
        sample_scheduler_kwargs: dict | None = None,
        sample_steps: int = 25,
        guidance_scale: float = 3.0,
        null_class: int | None = None,
        cache_latents: bool | None = None,
        cache_text_embeddings: bool = True,
        fused_adamw: bool | None = None,
        attention: str | None = None,
        channels_last: bool = False,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        family: str | None = None,
        sample_resolution: int | None = None,
        max_sequence_length: int | None = None,
        backbones: dict | None = None,
        precondition_outputs: bool | None = None,
        unmasked_weight: float = 0.0,
        masked_loss_normalize: bool = False,
        controlnet: str | None = None,
        controlnet_conditioning_scale: float = 1.0,
        guess_mode: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        # Before any component is loaded: a nonsense value fails in a second, naming its key.
        check_model_settings(self.hparams, type(self).__name__)
        for folder, owner in EXPORT_FOLDERS.items():
            if pretrained and (Path(pretrained) / folder).is_dir() and folder != self.export_folder:
                raise ValueError(
                    f"model.pretrained={pretrained!r} was exported by {owner}: its inserted modules ({folder}/) are "
                    f"part of the model; load it with lightning_ft.methods.{owner}"
                )
        # The family of a folder is known from its model_index.json before its components load: it says which
        # optional components the folder may list (anything else is refused by name).
        known = family_class(family) if family else family_for_pipeline(pipeline_class_of(pretrained))
        # Without a known family, a model may hold any family's frozen components (checked once it is recognised).
        frozen = known.frozen_components if known else tuple(k for c in REGISTRY.values() for k in c.frozen_components)
        parts = load_components(pretrained, components, known.accepted_components() if known else frozen, frozen)
        self.denoiser = parts.denoiser
        self.vae = parts.vae
        # Each text encoder (and tokenizer) is an attribute under its component key (text_encoder, text_encoder_2,
        # ...): the encoders are submodules that checkpoints, devices and dtypes reach.
        self.text_encoder_keys = tuple(sorted(parts.text_encoders))
        for key, component in (*parts.text_encoders.items(), *parts.tokenizers.items()):
            setattr(self, key, component)
        self._pipeline_info = (parts.pipeline_class, parts.pipeline_config, parts.declared, parts.tokenizers,
                               parts.extras)  # fmt: skip
        self.family = make_family(parts, family, null_class)
        self.frozen_component_keys = self.family.frozen_components
        stray = sorted(set(parts.extras) - set(self.family.accepted_components()))
        if stray:
            raise ValueError(f"model.components: {', '.join(stray)}: not a component of the {self.family.name} family")
        for key in self.frozen_component_keys:  # frozen submodules (devices, the denoiser's dtype); the pipeline's too
            if parts.extras.get(key) is None:
                raise ValueError(f"model: the {self.family.name} family needs its {key} (model.components.{key})")
            component = parts.extras[key]  # a module, or a processor the pipeline takes (not trained either)
            if isinstance(component, torch.nn.Module):
                component = component.requires_grad_(False).eval()
            setattr(self, key, component)
        for setting, value in self.family.vae_defaults.items():
            if self.vae is not None and self.vae.config.get(setting) is None:
                # A VAE made for another family (e.g. the embedded SD-style one under an SD3 transformer) lacks a
                # setting this family's pipelines read: give it the value that means "none".
                self.vae.register_to_config(**{setting: value})
        if max_sequence_length is not None:
            if not hasattr(self.family, "max_sequence_length"):
                raise ValueError(f"model.max_sequence_length: the {self.family.name} family has no T5 context")
            self.family.max_sequence_length = max_sequence_length
        # The process is read from the scheduler; an unknown one is refused here, naming it (core/noise_process.py).
        where = "model.pretrained" if pretrained else "model.components.scheduler"
        flow = {"logit_mean": logit_mean, "mode_scale": mode_scale, "loss_weighting": loss_weighting,
                "logit_std": self.family.default_logit_std if logit_std is None else logit_std, "shift": flow_shift,
                "tokens_per_latent": self.family.tokens_per_latent, "shift_rule": self.family.flow_shift_rule(parts),
                "precondition_outputs": self.family.precondition_outputs if precondition_outputs is None
                                        else precondition_outputs}  # fmt: skip
        try:
            kind = process_kind(parts.scheduler)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if kind not in self.family.processes:
            raise ValueError(
                f"{where}: the scheduler {type(parts.scheduler).__name__} describes {kind}, but the "
                f"{self.family.name} family's pipelines sample {' or '.join(self.family.processes)}"
            )
        density = timestep_density or self.family.default_timestep_density
        self.noise_process = noise_process_for(parts.scheduler, where, prediction_type, density, flow)
        self.noise_scheduler = self.noise_process.scheduler
        for frozen in (self.vae, *parts.encoders):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        self.frozen_denoiser = None
        if self.requires_frozen_denoiser:
            self.frozen_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        if frozen_dtype is not None:
            dtype = getattr(torch, frozen_dtype)
            for frozen in (self.vae, self.frozen_denoiser, *([] if train_text_encoder else parts.encoders)):
                if frozen is not None:
                    frozen.to(dtype)
        # A quantised base is made before the LoRA is inserted: PEFT picks its adapter layer by the weight's type.
        self.quantized_base = None
        if quantize != "none":
            encoders = {} if train_text_encoder else {key: getattr(self, key) for key in self.text_encoder_keys}
            self.quantized_base = quantize_frozen_parts(quantize, self.denoiser, self.frozen_denoiser, encoders)
        self.controlnet = None  # trainable='controlnet': the ControlNet beside the frozen denoiser
        with lora_over_quantized(quantize):
            self.configure_trainable()
        apply_speed_options(
            self.denoiser,
            self.parts.encoders if train_text_encoder else None,
            attention=attention,
            channels_last=channels_last,
            gradient_checkpointing=gradient_checkpointing,
            compile=compile,
        )
        # Checkpoints hold only trainable weights; the rest comes from `pretrained` (see on_load_checkpoint).
        self.strict_loading = False
        self.ema = None
        self.last_loss_parts: dict[str, torch.Tensor] = {}  # the latest training step's loss and its parts
        self._ema_global_step = 0
        # cache_latents=None (auto) is decided in on_fit_start, where the data module is known.
        self.latent_cache = EncodingCache() if cache_latents and self.vae is not None else None
        self.text_cache = EncodingCache() if cache_text_embeddings and not train_text_encoder else None
        # diffusers' and transformers' from_pretrained leave models in eval mode, and Lightning keeps the modes it
        # finds: put the trainable parts in train mode (dropout, a text encoder's gradient checkpointing).
        self.train()

    # ----------------------------------------------------------------------------------------------- components
    @property
    def parts(self) -> Components:
        """The components as one object (shares the modules), for the family and the pipeline."""
        pipeline_class, pipeline_config, declared, tokenizers, extras = self._pipeline_info
        encoders = {key: getattr(self, key) for key in self.text_encoder_keys}
        extras = dict(extras)
        if getattr(self, "controlnet", None) is not None:  # the family then builds its ControlNet pipeline
            extras["controlnet"] = self.controlnet
        return Components(
            self.denoiser, self.noise_scheduler, self.vae, encoders, dict(tokenizers), extras, pipeline_class,
            pipeline_config, declared,
        )  # fmt: skip

    @property
    def null_class(self) -> int | None:
        """The unconditional class of a class-conditional model (None otherwise, or when it has none)."""
        return getattr(self.family, "null_class", None)

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
        """Image side the model samples at: the side of a ``sampling_at`` block, else ``sample_resolution`` if set,
        else the side the denoiser was built for (its sample size times the VAE's downsampling factor; Flux: its
        pipeline's default)."""
        side = getattr(self, "_sampling_side", None)
        return side or self.hparams.sample_resolution or self.family.native_resolution(self.parts)

    @contextlib.contextmanager
    def sampling_at(self, side: int | None):
        """Within this block the model samples ``side`` px images (None: as it would anyway): training data it samples
        itself (class images, memory banks) is drawn at the training resolution, not at a pipeline default of 1024
        px that a config without a sample size (Flux) falls back to."""
        before = getattr(self, "_sampling_side", None)
        self._sampling_side = side or before
        try:
            yield
        finally:
            self._sampling_side = before

    @contextlib.contextmanager
    def without_controlnet(self):
        """Within this block the model samples and predicts as its base model, without its ControlNet (if any):
        Diff-Tuning's memory bank is the pretrained model's own samples."""
        controlnet = self.controlnet
        self.controlnet = None
        try:
            yield
        finally:
            self.controlnet = controlnet

    def vae_scale_factor(self) -> int:
        return self.family.vae_scale_factor(self.parts)

    def check_resolution(self, resolution: int) -> None:
        """Fail fast, naming ``data.resolution``, when the denoiser cannot take images of that size."""
        native = self.native_resolution()
        multiple = self.family.resolution_multiple(self.parts)
        if multiple is None:  # transformers (DiT) have a fixed positional grid
            if resolution != native:
                raise ValueError(f"data.resolution={resolution} but this model only takes {native}x{native} images")
            return
        if resolution % multiple:
            raise ValueError(f"data.resolution={resolution} is not a multiple of {multiple}, which this model needs")
        if resolution > 4 * native:
            raise ValueError(
                f"data.resolution={resolution} is over 4x the model's native {native} px; "
                "it would not be fine-tuning the pretrained model any more"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        check_quantized_fit(self.hparams.quantize, self.device, self.trainer.precision)
        if self.hparams.cache_latents is None and self.latent_cache is None and self.vae is not None:
            decide_latent_cache(self, getattr(self.trainer, "datamodule", None))

    def configure_trainable(self) -> None:
        """Choose the trainable parameters; methods that insert modules override this and call ``super()``."""
        h = self.hparams
        if h.trainable == "controlnet":
            if not self.trains_controlnets:
                raise ValueError(f"model.trainable='controlnet': {type(self).__name__} does not train ControlNets "
                                 "(DreamBooth, DiffTuning and DiffusionBase do)")  # fmt: skip
            self.family.check_controlnet()
            self.controlnet = self.family.make_controlnet(self.parts, h.controlnet)
            self.controlnet.requires_grad_(True).train()
        elif h.controlnet:
            raise ValueError(f"model.controlnet={h.controlnet!r} needs model.trainable='controlnet'")
        targets = h.lora_target_modules or self.family.default_lora_targets(self.denoiser)
        apply_trainable(self.denoiser, h.trainable, h.lora_rank, h.lora_alpha, targets, h.lora_dropout,
                        h.lora_variant)
        if h.train_text_encoder:
            for encoder in self.parts.encoders:  # every one: SDXL trains both, as diffusers' SDXL scripts
                encoder.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts never leave eval mode (dropout off), whatever Lightning does to the module tree.
        for frozen in (self.frozen_denoiser, self.vae, *(getattr(self, k) for k in self.frozen_component_keys)):
            if isinstance(frozen, torch.nn.Module):
                frozen.eval()
        if not self.hparams.train_text_encoder:
            for encoder in self.parts.encoders:
                encoder.eval()
        return self

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Images in [0, 1] for ``batch['prompts']`` (or ``batch['class_labels']``) with ``batch['seeds']`` (and
        ``batch['controls']``, a ControlNet's control images; ``batch['sources']``, an editing model's source
        images)."""
        seeds = [int(s) for s in batch["seeds"]]
        labels = batch.get("class_labels")
        labels = [int(label) for label in labels] if labels is not None else None
        inputs = self.family.sample_inputs(batch.get("prompts"), labels, len(seeds), where="predict")
        controls = batch.get("controls")  # a ControlNet's: the control image of each sample
        if controls is not None:
            inputs = self.family.with_controls(inputs, controls.cpu(), self.controlnet is not None)
        sources = batch.get("sources")  # an editing model's: the source image of each sample
        if sources is not None:
            inputs = self.family.with_sources(inputs, sources.cpu())
        return self.generate(**inputs.generate_kwargs(), seeds=seeds)
