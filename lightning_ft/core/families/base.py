"""``ModelFamily``: what differs between model families, behind one small interface.

A family knows its components and how to turn a batch's inputs (prompts, class labels, image sizes) into a
``Condition``, how to call its denoiser with one, which diffusers pipeline samples and exports it, and how its LoRA
weights are saved. ``DiffusionBase`` and the methods speak only to this interface (and to the noise process), so a
new family is one small subclass registered in ``lightning_ft.core.families``.

Inputs are the raw, per-sample conditions a user writes: a list of prompts for text families, a tensor of class
labels for class-conditional ones, ``None`` for unconditional models. ``null_inputs(n)`` are the inputs of the
unconditional branch (the empty prompt, the null class); they are encoded like any others, so the null condition
is built in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.conditions import Condition

TEXT, CLASS, NONE = "text", "class", "none"


def batch_timesteps(t, noisy: torch.Tensor) -> torch.Tensor:
    """Timesteps as one value per sample of ``noisy`` (a scalar is expanded), as the pipelines pass them."""
    t = torch.as_tensor(t, device=noisy.device)
    return (t[None] if t.ndim == 0 else t).expand(noisy.shape[0])


def unit_images(images: torch.Tensor) -> torch.Tensor:
    """Decoded images in [-1, 1] to [0, 1] floats."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


class ModelFamily:
    """The interface of a model family (module docstring); subclasses set ``name`` and ``kind``.

    Args:
        parts: the model's components (read for settings only; modules are passed to each call).
    """

    name: str = ""
    #: ``text`` (prompts), ``class`` (integer labels) or ``none`` (unconditional).
    kind: str = NONE
    #: The diffusers pipeline class that samples and exports this family (None: no pipeline fits).
    pipeline_class: str | None = None
    #: The key prefix of the pipeline's LoRA files (``unet``, ``transformer``); None: the pipeline has no LoRA loader.
    lora_prefix: str | None = None
    #: The noise processes this family's pipelines sample (``ddpm``, ``flow_matching``).
    processes: tuple[str, ...] = ("ddpm",)
    #: Training timestep density when ``model.timestep_density`` is not set (diffusers' script default).
    default_timestep_density: str = "uniform"
    #: The attention modules A3FTA adapts by default, by the last part of their name (self- and cross-attention).
    attention_names: tuple[str, ...] = ("attn1", "attn2")
    #: Latent pixels per image token of the denoiser (2x2 patches: 4), for a resolution-dependent flow shift.
    tokens_per_latent: int = 4
    #: The pipeline's argument that takes the denoiser (``unet``, ``transformer``) and how many text encoders (with
    #: their tokenizers: ``text_encoder``, ``text_encoder_2``, ...) it takes; ``pipeline_kwargs`` builds from them.
    denoiser_argument: str = "transformer"
    pipeline_text_encoders: int = 1

    def __init__(self, parts: Components):
        self.settings = dict(parts.pipeline_config)

    # ----------------------------------------------------------------------------------------------- inputs
    @property
    def input_key(self) -> str | None:
        """The ``generate`` argument that carries this family's inputs: ``prompts``, ``labels`` or None."""
        return {TEXT: "prompts", CLASS: "labels"}.get(self.kind)

    def batch_inputs(self, batch: dict, prompts_key: str = "prompts", labels_key: str = "class_labels"):
        """The raw inputs of a training batch (prompts, labels, or None)."""
        if self.kind == TEXT:
            return list(batch[prompts_key])
        if self.kind == CLASS:
            return torch.as_tensor(batch[labels_key])
        return None

    def null_inputs(self, n: int):
        """Inputs of the unconditional branch (guidance, condition dropout, retention on unconditional samples)."""
        return None

    def with_null(self, inputs, drop: torch.Tensor):
        """``inputs`` with the samples where ``drop`` is True replaced by the null input."""
        return inputs

    # --------------------------------------------------------------------------------------------- encoding
    def encode(self, module, inputs, n: int, geometry: dict[str, torch.Tensor]) -> Condition:
        """The condition of ``n`` samples. ``module`` is the ``DiffusionBase`` (its encoders and caches);
        ``geometry`` holds ``original_size``, ``crop_top_left`` and ``target_size`` (n, 2) of the images. Text
        families: the per-sample features of ``tokenize`` / ``encode_ids``, through the module's text cache."""
        if self.kind == TEXT:
            return Condition(module.text_features(inputs), n)
        return Condition({}, n)

    def denoise(self, denoiser: torch.nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: Condition):
        """The denoiser's raw output (``.sample``) for ``noisy`` at model timesteps ``t`` under ``cond``."""
        return denoiser(noisy, t).sample

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
        scheduler, the VAE, ``pipeline_text_encoders`` text encoders and tokenizers, and ``pipeline_options``."""
        kwargs = {self.denoiser_argument: parts.denoiser, "scheduler": scheduler, "vae": parts.vae}
        for suffix in ["", *(f"_{i}" for i in range(2, self.pipeline_text_encoders + 1))]:
            kwargs[f"text_encoder{suffix}"] = getattr(parts, f"text_encoder{suffix}")
            kwargs[f"tokenizer{suffix}"] = getattr(parts, f"tokenizer{suffix}")
        return {**kwargs, **self.pipeline_options()}

    def pipeline_options(self) -> dict:
        """Pipeline arguments that are settings, not components (default: none)."""
        return {}

    def build_pipeline(self, parts: Components, scheduler):
        """The diffusers pipeline of these components (shares the modules), or None when none fits."""
        if self.pipeline_class is None:
            return None
        import diffusers

        return getattr(diffusers, self.pipeline_class)(**self.pipeline_kwargs(parts, scheduler))

    def sample(self, module, pipe, inputs, seeds: Sequence[int], steps: int, guidance: float, negative_prompt=None):
        """Images in [0, 1] (N, C, H, W) for one chunk of inputs; image i from a generator seeded by ``seeds[i]``.
        Default: a text pipeline called with the prompts, ``negative_inputs`` and ``pipeline_call_kwargs``."""
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        pixel_space = pipe.vae is None
        out = pipe(
            list(inputs),
            num_inference_steps=steps,
            guidance_scale=guidance,
            negative_prompt=self.negative_inputs(negative_prompt, len(inputs)),
            generator=generators,
            output_type="latent" if pixel_space else "pt",
            **self.pipeline_call_kwargs(module),
        ).images
        return unit_images(out) if pixel_space else out.float().clamp(0, 1)

    def negative_inputs(self, negative_prompt: str | None, n: int):
        """The pipeline's ``negative_prompt`` argument (default: one per image, or None: the pipeline's own)."""
        return [negative_prompt] * n if negative_prompt else None

    def pipeline_call_kwargs(self, module) -> dict:
        """Extra arguments of the pipeline's ``__call__`` (sizes, sequence lengths) that sampling must match."""
        return {}

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
        ``save_lora_weights`` (read by its ``load_lora_weights``) when it has a LoRA loader (``lora_prefix`` set),
        else PEFT's adapter folder, which ``lightning_ft.core.trainable.load_peft_lora`` or PEFT puts back on a
        plain denoiser (diffusers has no LoRA loader for DiT- or PixArt-style pipelines). The adapter config (rank,
        alpha, targets) goes with the weights: without it ``load_lora_weights`` assumes alpha = rank, and a model
        trained with another alpha would load at the wrong scale."""
        if self.lora_prefix is None:
            from lightning_ft.core.trainable import save_peft_lora

            save_peft_lora(denoiser, path, state)
            return
        import diffusers

        getattr(diffusers, self.pipeline_class).save_lora_weights(
            path, **{f"{self.lora_prefix}_lora_layers": state, f"{self.lora_prefix}_lora_adapter_metadata": metadata}
        )

    def load_lora(self, denoiser: torch.nn.Module, path: Path) -> torch.nn.Module:
        """Put the LoRA that ``save_lora`` wrote back on a plain denoiser (in place; returned)."""
        if self.lora_prefix is None:
            from lightning_ft.core.trainable import load_peft_lora

            return load_peft_lora(denoiser, path)
        # diffusers' own loader of the files save_lora_weights writes (keys prefixed, adapter metadata).
        denoiser.load_lora_adapter(
            str(path), weight_name="pytorch_lora_weights.safetensors", prefix=self.lora_prefix, adapter_name="default"
        )
        return denoiser

    # ------------------------------------------------------------------------------------------- defaults
    def default_lora_targets(self, denoiser: torch.nn.Module) -> tuple[str, ...]:
        from lightning_ft.core.trainable import default_lora_targets

        return default_lora_targets(denoiser)

    def describe(self) -> str:
        return f"{self.name} ({self.kind}-conditioned)"
