"""``ModelFamily``: everything model-specific, behind one small interface; each family registers itself.

A family knows the pipeline classes it serves and how to recognise a model built from configs (``matches``); its
components (text encoders and tokenizers by key); how what a sample is asked with (``sample_inputs``: prompts,
labels, nothing) and a batch's inputs become a ``Condition``; the denoiser call; the VAE's latent space; the noise
process its pipelines sample; the pipeline that samples and exports; its LoRA targets and file layout; BNN's layer
selection and the FSDP blocks. ``DiffusionBase``, the methods, callbacks, data module and report speak only to this
interface, so a new family is one file: a subclass that sets ``name`` is registered (``REGISTRY``) when its module is
imported (``lightning_ft.core.families.FAMILY_MODULES``).

Raw inputs are what a family encodes: a list of prompts (text families), a tensor of class labels (class-conditional)
or ``None`` (unconditional). ``null_inputs(n)`` are the inputs of the unconditional branch (the empty prompt, the null
class); they are encoded like any others, so the null condition is built in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_ft.core.components import Components, tokenizer_key
from lightning_ft.core.conditions import Condition
from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.core.sampling_loop import unit_images

#: Every registered family by name, in registration order (``ModelFamily.__init_subclass__``).
REGISTRY: dict[str, type[ModelFamily]] = {}

#: BNN's selection carried over to transformer denoisers (INFERRED: the released BNN code covers UNets only). Every
#: linear of the blocks except the conditioning paths, as the UNet rule keeps out ``attn2`` and ``time_emb_proj``:
#: text cross-attention, adaLN linears (every linear inside a ``norm*`` module: modulation and per-block timestep /
#: class embedders), timestep embedders and the text stream of joint attention. What stays: the self-attention
#: q/k/v/out and the feed-forward of every block.
TRANSFORMER_BNN_INCLUDE = ("transformer_blocks.*", "single_transformer_blocks.*")
TRANSFORMER_BNN_EXCLUDE = (
    "*.attn2.*",  # cross-attention to the text (PixArt)
    "*.time_emb_proj",
    r"re:.*\.norm[^.]*\..*",  # adaLN: linears inside norm1 / norm1_context / norm
    "*.timestep_embedder.*",
    "*.attn.add_q_proj",  # the text stream of joint attention (SD3, Flux)
    "*.attn.add_k_proj",
    "*.attn.add_v_proj",
    "*.attn.to_add_out",
    "*.ff_context.*",
)


#: The processes of flow-matching families.
FLOW = ("flow_matching",)


def pipeline_max_sequence_length(pipeline_class: str) -> int:
    """The ``max_sequence_length`` default of a pipeline's ``__call__`` (e.g. 300 for PixArtSigmaPipeline)."""
    import inspect

    import diffusers

    return inspect.signature(getattr(diffusers, pipeline_class).__call__).parameters["max_sequence_length"].default


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token (``FluxPipeline._pack_latents``, the layout of
    Flux.1 and Qwen-Image)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack_2x2`` for latents of side ``h`` x ``w``."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def batch_timesteps(t, noisy: torch.Tensor) -> torch.Tensor:
    """Timesteps as one value per sample of ``noisy`` (a scalar is expanded), as the pipelines pass them."""
    t = torch.as_tensor(t, device=noisy.device)
    return (t[None] if t.ndim == 0 else t).expand(noisy.shape[0])




class ModelFamily:
    """The interface of a model family (module docstring). The base is the unconditional case; subclasses set
    ``name`` (which registers them) and what differs.

    Args:
        parts: the model's components (read for settings only; modules are passed to each call).
        null_class: ``model.null_class``, for families that take one (``uses_null_class``).
    """

    name: str = ""
    #: The model_index.json ``_class_name``s this family trains.
    pipelines: tuple[str, ...] = ()
    #: Pipelines of this family's models that it does not train yet -> why (refused by name, never trained as another).
    refused: dict[str, str] = {}
    #: The diffusers pipeline class that samples and exports this family (None: no pipeline fits).
    pipeline_class: str | None = None
    #: Component keys of the text encoders it reads (tokenizers pair by suffix: ``text_encoder_2`` / ``tokenizer_2``).
    text_encoders: tuple[str, ...] = ()
    #: Other components its folders may list (kept aside, not trained); None: the pipeline's ``_optional_components``.
    extra_components: tuple[str, ...] | None = None
    #: Components besides the denoiser, VAE and text encoders that its pipeline needs and that lightning-ft keeps
    #: frozen (Ideogram 4's unconditional transformer): loaded from a folder or built from configs, held beside the
    #: denoiser (its device and dtype: ``frozen_dtype`` leaves them), passed to the pipeline that samples and exports.
    frozen_components: tuple[str, ...] = ()
    #: What it does, in words (model cards' tags, ``describe``).
    task: str = "unconditional image generation"
    #: ``matches`` is tried in this order (lower first) for a model without a known pipeline.
    detect_order: int = 100
    #: The key prefix of the pipeline's LoRA files (``unet``, ``transformer``); None: the pipeline has no LoRA loader.
    lora_prefix: str | None = None
    #: Default ``model.lora_target_modules``; None: the q/k/v/out projections of every attention module.
    lora_targets: tuple[str, ...] | None = None
    #: BNN's layer selection (patterns over module names, see ``lightning_ft.nn.bayesian``); None: the released rule.
    bnn_include: tuple[str, ...] | None = None
    bnn_exclude: tuple[str, ...] | None = None
    #: The denoiser's blocks that FSDP wraps one unit each, as ``module:Class``.
    fsdp_blocks: tuple[str, ...] = ()
    #: The noise processes this family's pipelines sample (``ddpm``, ``flow_matching``).
    processes: tuple[str, ...] = ("ddpm",)
    #: Flow matching: the loss on the implied x0 (``model.precondition_outputs`` unset: its script's default).
    precondition_outputs: bool = False
    #: Training timestep density when ``model.timestep_density`` is not set (diffusers' script default).
    default_timestep_density: str = "uniform"
    #: Flow matching: the logit-normal density's std when ``model.logit_std`` is not set (its script's).
    default_logit_std: float = 1.0
    #: The attention modules A3FTA adapts by default, by the last part of their name (self- and cross-attention).
    attention_names: tuple[str, ...] = ("attn1", "attn2")
    #: The denoiser's module whose output is its time embedding, which A3FTA's adapters read (None: the first
    #: diffusers ``TimestepEmbedding``).
    time_embedding: str | None = None
    #: Latent pixels per image token of the denoiser (2x2 patches: 4), for a resolution-dependent flow shift.
    tokens_per_latent: int = 4
    #: The pipeline's argument that takes the denoiser (``unet``, ``transformer``).
    denoiser_argument: str = "transformer"
    #: True for families whose condition has a null class (``model.null_class``).
    uses_null_class: bool = False
    #: Settings a VAE of another family may lack that this family's pipelines read -> the value that means "none".
    vae_defaults: dict = {}
    #: The Hub's pipeline tag of the exports (model cards; None: no tag fits).
    hub_task: str | None = "unconditional-image-generation"
    #: The pipeline that samples and exports this family's models with a ControlNet (``model.trainable:
    #: controlnet``); None: the family has no ControlNet training (refused by name).
    controlnet_pipeline: str | None = None
    #: True for an editing family: every training image pairs with a source image (``data.source_dir``), the
    #: condition holds what the model reads of it (``encode_sources``) and samples are asked with one
    #: (``with_sources``).
    needs_source: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name:
            if name in REGISTRY and REGISTRY[name] is not cls:
                raise TypeError(f"model family {name!r} registered twice ({REGISTRY[name].__name__}, {cls.__name__})")
            REGISTRY[name] = cls

    @classmethod
    def matches(cls, parts: Components) -> bool:
        """True when ``parts`` (a model built from configs, or a folder of an unknown pipeline) is of this family."""
        return False

    @classmethod
    def accepted_components(cls) -> tuple[str, ...]:
        """Component keys besides denoiser, scheduler, VAE, text encoders and tokenizers that its folders may list
        (its ``frozen_components`` first)."""
        if cls.extra_components is not None:
            return (*cls.frozen_components, *cls.extra_components)
        import diffusers

        pipeline = getattr(diffusers, cls.pipeline_class or "", None)
        optional = getattr(pipeline, "_optional_components", None) or []
        return (*cls.frozen_components, *(k for k in optional if not k.startswith(("text_encoder", "tokenizer"))))

    def __init__(self, parts: Components, null_class: int | None = None):
        if null_class is not None and not self.uses_null_class:
            raise ValueError(f"model.null_class={null_class} is only for class-conditional models, not {self.name}")
        self.settings = dict(parts.pipeline_config)

    # ----------------------------------------------------------------------------------------------- inputs
    def sample_inputs(
        self, prompts=None, labels=None, n: int | None = None, where: str = "generate", required: bool = True
    ) -> SampleInputs:
        """What samples of this model are asked with, from what the caller offers (prompts, labels, a count). A
        family keeps what its model reads; when that is missing it raises ValueError naming ``where``, or with
        ``required=False`` returns ``n`` samples asked with nothing (``conditional`` False: the null condition).
        The base (unconditional) takes a count: ``n``, or the number of prompts / labels offered."""
        if n is None:
            offered = prompts if prompts is not None else labels
            if offered is None:
                raise ValueError(f"{where}: give the number of samples (seeds) of this {self.describe()} model")
            n = len(offered)
        return SampleInputs(int(n))

    def batch_inputs(self, batch: dict, prompts_key: str = "prompts", labels_key: str = "class_labels"):
        """The raw inputs of a training batch (prompts, labels, or None)."""
        return None

    def raw_inputs(self, inputs: SampleInputs):
        """The raw inputs ``encode`` takes for these sample inputs."""
        return None

    def null_inputs(self, n: int):
        """Inputs of the unconditional branch (guidance, condition dropout, retention on unconditional samples)."""
        return None

    def with_null(self, inputs, drop: torch.Tensor):
        """``inputs`` with the samples where ``drop`` is True replaced by the null input."""
        return inputs

    def needs_labels(self) -> bool:
        """True when its training data must carry integer labels."""
        return False

    def retention_inputs(self, count: int, prompts: Sequence[str] | None = None) -> SampleInputs:
        """What ``count`` source-domain images (Diff-Tuning's memory bank) are sampled with: ``prompts`` (the
        ``memory_prompts`` setting) cycled, else the unconditional branch's input; a family whose model is asked with
        something else refuses ``prompts``."""
        if prompts is not None:
            raise ValueError(f"model.memory_prompts needs a text-conditioned model, not a {self.describe()}")
        return SampleInputs(count)

    # --------------------------------------------------------------------------------------------- encoding
    def encode(self, module, inputs, n: int, geometry: dict[str, torch.Tensor]) -> Condition:
        """The condition of ``n`` samples. ``module`` is the ``DiffusionBase`` (its encoders and caches);
        ``geometry`` holds ``original_size``, ``crop_top_left`` and ``target_size`` (n, 2) of the images. Text
        families: the per-sample features of ``tokenize`` / ``encode_ids``, through the module's text cache."""
        return Condition({}, n)

    def denoise(self, denoiser: torch.nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: Condition):
        """The denoiser's raw output (``.sample``) for ``noisy`` at model timesteps ``t`` under ``cond``. A family with
        a ``controlnet_pipeline`` also takes the residuals of ``control_residuals`` as keyword arguments."""
        return denoiser(noisy, t).sample

    # ---------------------------------------------------------------------------------------------- ControlNet
    def check_controlnet(self, where: str = "model.trainable='controlnet'") -> None:
        """Refuse ControlNet training for a family without it, naming the families that have it."""
        if self.controlnet_pipeline is None:
            from lightning_ft.core.families import REGISTRY

            having = sorted(name for name, cls in REGISTRY.items() if cls.controlnet_pipeline)
            raise ValueError(f"{where}: the {self.name} family has no ControlNet training in lightning-ft (it has: "
                             f"{', '.join(having)})")  # fmt: skip

    def make_controlnet(self, parts: Components, path: str | None = None) -> torch.nn.Module:
        """The ControlNet to train: loaded from ``path`` (a ControlNet folder), else initialised from the denoiser."""
        self.check_controlnet()
        raise NotImplementedError

    def control_residuals(self, controlnet, noisy: torch.Tensor, t: torch.Tensor, cond: Condition) -> dict:
        """The ControlNet's residuals for the denoiser call (keyword arguments of ``denoise``) under ``cond``, whose
        ``controlnet_cond`` field holds the control images (B, 3, H, W) in [0, 1]."""
        self.check_controlnet()
        raise NotImplementedError

    def with_controls(self, inputs: SampleInputs, controls, has_controlnet: bool) -> SampleInputs:
        """``inputs`` with their control images (``generate(controls=...)``), checked: one per sample, (3, H, W) in
        [0, 1], and a model with a ControlNet to read them."""
        if not has_controlnet:
            raise ValueError("generate(controls=...): this model has no ControlNet (model.trainable='controlnet')")
        controls = torch.as_tensor(controls)
        if controls.ndim != 4 or controls.shape[1] != 3 or len(controls) != len(inputs):
            raise ValueError(f"generate: controls of shape {tuple(controls.shape)}: need ({len(inputs)}, 3, H, W), "
                             "one control image per sample")  # fmt: skip
        if controls.min() < 0 or controls.max() > 1:
            raise ValueError("generate: control images must be in [0, 1] (as diffusers' ControlNet pipelines take "
                             "tensors)")  # fmt: skip
        return inputs.with_controls(controls.float().cpu())

    # ---------------------------------------------------------------------------------------------- editing
    def with_sources(self, inputs: SampleInputs, sources) -> SampleInputs:
        """``inputs`` with their source images (``generate(sources=...)``), checked: one per sample, (3, H, W) in
        [0, 1]; refused for a family that is not an editing one (``needs_source``)."""
        if not self.needs_source:
            having = sorted(name for name, cls in REGISTRY.items() if cls.needs_source)
            raise ValueError(f"generate(sources=...): the {self.name} family is not an editing model; source images "
                             f"are for {', '.join(having) or 'editing families'}")  # fmt: skip
        sources = torch.as_tensor(sources)
        if sources.ndim != 4 or sources.shape[1] != 3 or len(sources) != len(inputs):
            raise ValueError(f"generate: sources of shape {tuple(sources.shape)}: need ({len(inputs)}, 3, H, W), "
                             "one source image per sample")  # fmt: skip
        if sources.min() < 0 or sources.max() > 1:
            raise ValueError("generate: source images must be in [0, 1]")
        return inputs.with_sources(sources.float().cpu())

    def encode_sources(self, module, condition: Condition, inputs, sources: torch.Tensor) -> Condition:
        """An editing family's condition of a batch (``condition``: its ``encode`` of ``inputs``) with what its
        denoiser reads of the source images (B, 3, H, W) in [0, 1]; refused for the other families."""
        raise ValueError(f"the batch has source images (data.source_dir or a cond_image column), but the {self.name} "
                         "family is not an editing model")  # fmt: skip

    # ------------------------------------------------------------------------------------------- latent space
    def vae_posterior(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior of images in [-1, 1] as (N, 2, ...): mean and std (a deterministic autoencoder such as
        Sana's ``AutoencoderDC``: its latent with zero spread). ``model_latents`` turns a draw into model space."""
        encoded = vae.encode(pixels)
        dist = getattr(encoded, "latent_dist", None)
        if dist is None:
            return torch.stack([encoded.latent, torch.zeros_like(encoded.latent)], dim=1)
        return torch.stack([dist.mean, dist.std], dim=1)

    def model_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """A VAE latent in the denoiser's space: ``(latent - shift_factor) * scaling_factor``, as the pipelines
        undo it before decoding."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def round_trip(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] encoded (posterior mode) and decoded, in [-1, 1]."""
        encoded = vae.encode(pixels)
        dist = getattr(encoded, "latent_dist", None)
        return vae.decode(dist.mode() if dist is not None else encoded.latent).sample

    # ---------------------------------------------------------------------------------------- sizes, classes
    def latent_size(self, parts: Components) -> int:
        """The denoiser's native input side (latent pixels)."""
        size = parts.denoiser.config.sample_size
        return size if isinstance(size, int) else size[0]

    def vae_scale_factor(self, parts: Components) -> int:
        return 2 ** (len(parts.vae.config.block_out_channels) - 1) if parts.vae is not None else 1

    def native_resolution(self, parts: Components) -> int:
        return self.latent_size(parts) * self.vae_scale_factor(parts)

    def resolution_multiple(self, parts: Components) -> int | None:
        """Image sides must be multiples of this; None: only the native resolution fits (fixed positional grid)."""
        blocks = getattr(parts.denoiser.config, "block_out_channels", None)
        return None if blocks is None else self.vae_scale_factor(parts) * 2 ** (len(blocks) - 1)

    # ------------------------------------------------------------------------------------- sampling, export
    def pipeline_kwargs(self, parts: Components, scheduler) -> dict:
        """The arguments of ``pipeline_class`` built from the components: the denoiser (``denoiser_argument``), the
        scheduler, the VAE, the ``text_encoders`` with their tokenizers (None where the model has none), the extra
        components the folder had, and ``pipeline_options``."""
        kwargs = {self.denoiser_argument: parts.denoiser, "scheduler": scheduler, "vae": parts.vae}
        for key in self.text_encoders:
            kwargs[key] = parts.text_encoders.get(key)
            kwargs[tokenizer_key(key)] = parts.tokenizers.get(tokenizer_key(key))
        return {**kwargs, **parts.extras, **self.pipeline_options()}

    def flow_shift_rule(self, parts: Components):
        """Flow matching: the shift exponent mu of a latent shape (sigmas shifted by exp(mu)) that its pipelines
        sample with and its script trains at, when ``model.flow_shift`` is not set; None (default): the
        scheduler's (its fixed ``shift``, or the token-linear rule of ``use_dynamic_shifting``)."""
        return None

    def pipeline_options(self) -> dict:
        """Pipeline arguments that are settings, not components (default: none)."""
        return {}

    def build_pipeline(self, parts: Components, scheduler):
        """The diffusers pipeline of these components (shares the modules), or None when none fits; the family's
        ``controlnet_pipeline`` when the components hold a ControlNet (``parts.extras['controlnet']``)."""
        name = self.controlnet_pipeline if parts.extras.get("controlnet") is not None else self.pipeline_class
        if name is None:
            return None
        import diffusers

        return getattr(diffusers, name)(**self.pipeline_kwargs(parts, scheduler))

    def sample(
        self, module, pipe, inputs: SampleInputs, seeds: Sequence[int], steps: int, guidance: float,
        negative_prompt: str | None = None,
    ):
        """Images in [0, 1] (N, C, H, W) for one chunk of inputs; image i from a generator seeded by ``seeds[i]``.
        Default: a text pipeline called with the prompts, ``negative_inputs`` and ``pipeline_call_kwargs``."""
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        pixel_space = pipe.vae is None
        out = pipe(
            list(inputs.prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            negative_prompt=self.negative_inputs(negative_prompt, len(inputs)),
            generator=generators,
            output_type="latent" if pixel_space else "pt",
            **self.pipeline_call_kwargs(module),
            **self.control_call_kwargs(module, inputs),
        ).images
        return unit_images(out) if pixel_space else out.float().clamp(0, 1)

    def negative_inputs(self, negative_prompt: str | None, n: int):
        """The pipeline's ``negative_prompt`` argument (default: one per image, or None: the pipeline's own)."""
        return [negative_prompt] * n if negative_prompt else None

    def pipeline_call_kwargs(self, module) -> dict:
        """Extra arguments of the pipeline's ``__call__`` (sizes, sequence lengths) that sampling must match."""
        return {}

    def control_call_kwargs(self, module, inputs: SampleInputs) -> dict:
        """A ControlNet pipeline's arguments for samples asked with control images: the images (tensors in [0, 1],
        as the pipelines take them), their size, and the model's ``controlnet_conditioning_scale`` and
        ``guess_mode``; nothing for samples without controls."""
        if inputs.controls is None:
            if module.controlnet is not None:
                raise ValueError("generate: this model has a ControlNet: give controls (one control image per sample)")
            return {}
        images = torch.stack(list(inputs.controls))
        h = module.hparams
        return {
            "image": images, "height": images.shape[-2], "width": images.shape[-1],
            "controlnet_conditioning_scale": h.controlnet_conditioning_scale, "guess_mode": h.guess_mode,
        }  # fmt: skip

    def export(self, parts: Components, scheduler, path: Path) -> dict:
        """Write the export folder; return what ``lightning_ft.json`` must record besides the backbones."""
        pipe = self.build_pipeline(parts, scheduler)
        if pipe is None:
            parts.denoiser.save_pretrained(path / "denoiser")
            scheduler.save_pretrained(path / "scheduler")
        else:
            pipe.save_pretrained(path)
        return {}

    def save_lora(self, path: Path, denoiser: torch.nn.Module, state: dict, metadata: dict) -> None:
        """Write LoRA weights in the layout this family's users load them with: the pipeline's own
        ``save_lora_weights`` (read by its ``load_lora_weights``) when it has a LoRA loader (``lora_prefix`` set) and
        the variant is one diffusers reads (LoRA, DoRA), else PEFT's adapter folder, which
        ``lightning_ft.core.trainable.load_peft_lora`` or PEFT (``set_peft_model_state_dict``) puts back on a plain
        denoiser: diffusers has no LoRA loader for DiT- or PixArt-style pipelines, nor for LoHa, LoKr or OFT. A PEFT
        folder gets a ``lightning_ft.json`` saying so (``lora`` record: format, variant, loader), since
        ``load_lora_weights`` would not read it. The adapter config (rank, alpha, targets, DoRA) goes with the weights
        either way: without it ``load_lora_weights`` assumes alpha = rank and plain LoRA, and a model trained with
        another alpha would load at the wrong scale."""
        from lightning_ft.core.trainable import DIFFUSERS_LORA_VARIANTS, lora_variant_of

        variant = lora_variant_of(next(iter(denoiser.peft_config.values())))
        if self.lora_prefix is None or variant not in DIFFUSERS_LORA_VARIANTS:
            from lightning_ft.core.trainable import save_peft_lora
            from lightning_ft.metrics.backbones import write_declaration

            save_peft_lora(denoiser, path, state)
            why = (f"diffusers has no loader for {variant}" if self.lora_prefix else
                   f"diffusers' {self.pipeline_class} has no LoRA loader")  # fmt: skip
            record = {"format": "peft", "variant": variant, "denoiser": self.denoiser_argument,
                      "loader": "lightning_ft.core.trainable.load_peft_lora(denoiser, folder), or PEFT's "
                                "set_peft_model_state_dict with the adapter_config.json config inserted "
                                f"(not load_lora_weights: {why})"}  # fmt: skip
            write_declaration({}, path, {"lora": record})
            return
        import diffusers

        getattr(diffusers, self.pipeline_class).save_lora_weights(
            path, **{f"{self.lora_prefix}_lora_layers": state, f"{self.lora_prefix}_lora_adapter_metadata": metadata}
        )

    def load_lora(self, denoiser: torch.nn.Module, path: Path) -> torch.nn.Module:
        """Put the LoRA that ``save_lora`` wrote back on a plain denoiser (in place; returned): a PEFT adapter folder
        (it holds ``adapter_config.json``) through ``load_peft_lora``, else diffusers' own loader."""
        from lightning_ft.core.trainable import PEFT_CONFIG_FILE, load_peft_lora

        if self.lora_prefix is None or (Path(path) / PEFT_CONFIG_FILE).is_file():
            return load_peft_lora(denoiser, path)
        # diffusers' own loader of the files save_lora_weights writes (keys prefixed, adapter metadata).
        denoiser.load_lora_adapter(
            str(path), weight_name="pytorch_lora_weights.safetensors", prefix=self.lora_prefix, adapter_name="default"
        )
        return denoiser

    # ------------------------------------------------------------------------------------------- defaults
    def default_lora_targets(self, denoiser: torch.nn.Module) -> tuple[str, ...]:
        if self.lora_targets is not None:
            return self.lora_targets
        from lightning_ft.core.trainable import default_lora_targets

        return default_lora_targets(denoiser)

    def usage_example(self, prompt: str, settings: str) -> str | None:
        """The line of a model card's example that samples the exported pipeline (None: the card shows none)."""
        return None

    def describe(self) -> str:
        return f"{self.name} ({self.task})"
