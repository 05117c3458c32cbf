"""Model families: one small adapter per kind of pipeline, chosen from the folder's ``model_index.json``.

| family              | pipelines                                   | condition                                  |
|---------------------|---------------------------------------------|--------------------------------------------|
| ``stable_diffusion``| StableDiffusionPipeline (SD1.x, SD2.x)      | CLIP last hidden state                     |
| ``sdxl``            | StableDiffusionXLPipeline                   | 2 CLIP penultimate states, pooled, time ids|
| ``class_conditional``| DiTPipeline, class-conditional UNets       | class labels (null class for guidance)     |
| ``unconditional``   | DDIMPipeline, DDPMPipeline                  | none                                       |
| ``pixart_sigma``    | PixArtSigmaPipeline                         | T5 last hidden state and its attention mask|
| ``sd3``             | StableDiffusion3Pipeline (SD3, SD3.5)       | 2 CLIP penultimate + T5, pooled (flow)     |
| ``flux``            | FluxPipeline (Flux.1 dev, schnell)          | T5 context, CLIP pooled, ids, guidance (flow)|
| ``sana``            | SanaPipeline                                | Gemma2 states (+ instruction) and mask (flow)|

A model built from component configs (no ``model_index.json``) is recognised from its parts; ``model.family``
names one explicitly. PixArt-Alpha and Sana-Sprint are refused, naming the pipeline; an unknown pipeline is recognised
from its parts with a warning.
"""

from __future__ import annotations

import warnings

from lightning_ft.core.components import Components
from lightning_ft.core.families.base import CLASS, NONE, TEXT, ModelFamily
from lightning_ft.core.families.class_conditional import ClassConditional, Unconditional, denoise_loop, guided
from lightning_ft.core.families.flow import Flux, StableDiffusion3
from lightning_ft.core.families.pixart import PixArtSigma
from lightning_ft.core.families.sana import Sana
from lightning_ft.core.families.stable_diffusion import StableDiffusion, StableDiffusionXL

FAMILIES: dict[str, type[ModelFamily]] = {
    cls.name: cls
    for cls in (
        StableDiffusion,
        StableDiffusionXL,
        StableDiffusion3,
        Flux,
        ClassConditional,
        Unconditional,
        PixArtSigma,
        Sana,
    )
}
#: model_index.json ``_class_name`` -> family.
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "stable_diffusion",
    "StableDiffusionXLPipeline": "sdxl",
    "DiTPipeline": "class_conditional",
    "DDIMPipeline": "unconditional",
    "DDPMPipeline": "unconditional",
    "PixArtSigmaPipeline": "pixart_sigma",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "SanaPipeline": "sana",
}
#: Pipelines users fine-tune that this version does not train yet, and why.
NOT_YET = {
    # Not the same as Sigma: 120 tokens, and its 1024 models take resolution / aspect-ratio micro-conditions.
    "PixArtAlphaPipeline": "PixArt-Alpha's micro-conditions are not implemented yet (PixArtSigmaPipeline is)",
    "SanaSprintPipeline": "the guidance-distilled Sana-Sprint is not implemented yet (SanaPipeline is)",
}


def detect_family(parts: Components) -> str:
    """The family name of these components: from the pipeline class, else from the parts themselves."""
    if parts.pipeline_class in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[parts.pipeline_class]
    if parts.pipeline_class in NOT_YET:
        raise NotImplementedError(
            f"model.pretrained: {parts.pipeline_class} ({NOT_YET[parts.pipeline_class]}) is not supported by this "
            f"version of lightning-ft; supported pipelines: {', '.join(sorted(PIPELINE_FAMILIES))}"
        )
    family = _family_from_parts(parts)
    if parts.pipeline_class is not None:
        warnings.warn(
            f"model.pretrained: pipeline {parts.pipeline_class} is not one lightning-ft knows; it is trained as the "
            f"{family!r} family, recognised from its components (set model.family to choose)",
            stacklevel=2,
        )
    return family


def _family_from_parts(parts: Components) -> str:
    config = parts.denoiser.config
    if type(parts.denoiser).__name__ == "SD3Transformer2DModel":
        return "sd3"
    if type(parts.denoiser).__name__ == "FluxTransformer2DModel":
        return "flux"
    if type(parts.denoiser).__name__ == "SanaTransformer2DModel":
        return "sana"
    if type(parts.denoiser).__name__ == "PixArtTransformer2DModel":
        # Its adaLN timestep table (num_embeds_ada_norm) must not pass it for a class-conditional model.
        if type(parts.text_encoder).__name__ != "T5EncoderModel":
            raise NotImplementedError(
                "a PixArtTransformer2DModel is supported as PixArt-Sigma, with its T5EncoderModel text encoder and "
                f"tokenizer (this model's text encoder: {type(parts.text_encoder).__name__})"
            )
        return "pixart_sigma"
    if parts.text_encoder_2 is not None and getattr(config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if parts.text_encoder is not None:
        if type(parts.denoiser).__name__ != "UNet2DConditionModel":
            raise NotImplementedError(
                f"a text-conditioned {type(parts.denoiser).__name__} is not supported by this version of "
                f"lightning-ft (supported text families: UNet2DConditionModel as SD1.x/2.x or SDXL)"
            )
        return "stable_diffusion"
    if getattr(config, "num_class_embeds", None) or getattr(config, "num_embeds_ada_norm", None):
        return "class_conditional"
    return "unconditional"


def make_family(parts: Components, name: str | None = None, null_class: int | None = None) -> ModelFamily:
    """The family adapter of ``parts`` (``name``: the ``model.family`` setting, None = detect)."""
    name = name or detect_family(parts)
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not one of {sorted(FAMILIES)}")
    cls = FAMILIES[name]
    if cls.kind != CLASS and null_class is not None:
        raise ValueError(f"model.null_class={null_class} is only for class-conditional models, not {name}")
    try:
        return cls(parts, null_class=null_class) if cls.kind == CLASS else cls(parts)
    except (AttributeError, TypeError, KeyError) as error:
        raise ValueError(
            f"model.family={name!r} does not fit this model (denoiser {type(parts.denoiser).__name__}: {error}); "
            f"leave it unset to detect the family ({detect_family(parts)!r} here)"
        ) from None


__all__ = [
    "CLASS", "FAMILIES", "NONE", "TEXT", "ClassConditional", "Flux", "ModelFamily", "PixArtSigma", "Sana",
    "StableDiffusion", "StableDiffusion3", "StableDiffusionXL", "Unconditional", "denoise_loop", "detect_family",
    "guided", "make_family",
]  # fmt: skip
