"""Model families: one file per family, each registering itself (``ModelFamily.__init_subclass__``).

A family is chosen from the folder's ``model_index.json`` (the pipeline classes it declares in ``pipelines``), else
recognised from the components of a model built from configs (its ``matches``, tried in ``detect_order``);
``model.family`` names one explicitly. A pipeline a family declares in ``refused`` (an editing, inpainting or other
variant it does not train yet) is refused naming the pipeline; a pipeline no family knows is trained as the family
its components match, with a warning naming both, or refused naming it when none matches. The families' own files
hold everything model-specific; this module only imports them (``FAMILY_MODULES``: every module of this package,
found on disk) and looks them up.

To add a family: write ``<name>.py`` here with a ``ModelFamily`` subclass that sets ``name``; nothing else in the
package changes.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings

from lightning_ft.core.components import Components
from lightning_ft.core.families.base import REGISTRY, ModelFamily
from lightning_ft.core.families.inputs import SampleInputs

#: The modules whose families are registered: every module of this package, in alphabetical order (the order
#: ``matches`` ties are broken in, after each family's ``detect_order``). Found on disk rather than listed, so that a
#: family is one new file and no other file of the package changes.
FAMILY_MODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))
for _module in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

from lightning_ft.core.families.class_conditional import ClassConditional, Unconditional  # noqa: E402
from lightning_ft.core.families.joint_transformer import Flux, StableDiffusion3  # noqa: E402
from lightning_ft.core.families.pixart import PixArtSigma  # noqa: E402
from lightning_ft.core.families.sana import Sana  # noqa: E402
from lightning_ft.core.families.stable_diffusion import StableDiffusion, StableDiffusionXL  # noqa: E402
from lightning_ft.core.sampling_loop import denoise_loop, guided  # noqa: E402

#: Family name -> class (every registered family).
FAMILIES = REGISTRY


def supported_pipelines() -> list[str]:
    return sorted(p for cls in REGISTRY.values() for p in cls.pipelines)


def family_for_pipeline(pipeline_class: str | None) -> type[ModelFamily] | None:
    """The family that trains ``pipeline_class`` (None: no family declares it). Raises NotImplementedError, naming
    the pipeline and why, for a pipeline a family refuses."""
    if pipeline_class is None:
        return None
    for cls in REGISTRY.values():
        if pipeline_class in cls.pipelines:
            return cls
    for cls in REGISTRY.values():
        if pipeline_class in cls.refused:
            raise NotImplementedError(
                f"model.pretrained: {pipeline_class} is not supported by this version of lightning-ft "
                f"({cls.refused[pipeline_class]}); the {cls.name} family trains {', '.join(cls.pipelines)}"
            )
    return None


def detect_family(parts: Components) -> str:
    """The family name of these components: from the pipeline class, else from the parts themselves."""
    known = family_for_pipeline(parts.pipeline_class)
    if known is not None:
        return known.name
    for cls in sorted(REGISTRY.values(), key=lambda c: c.detect_order):
        if cls.matches(parts):
            if parts.pipeline_class is not None:
                warnings.warn(
                    f"model.pretrained: pipeline {parts.pipeline_class} is not one lightning-ft knows; it is trained "
                    f"as the {cls.name!r} family ({', '.join(cls.pipelines)}), recognised from its components (set "
                    "model.family to choose)",
                    stacklevel=2,
                )
            return cls.name
    encoders = ", ".join(type(e).__name__ for e in parts.encoders) or "none"
    what = f"pipeline {parts.pipeline_class}" if parts.pipeline_class else "a model built from components"
    raise NotImplementedError(
        f"model: {what} (denoiser {type(parts.denoiser).__name__}, text encoders: {encoders}) is not one "
        f"lightning-ft supports; supported pipelines: {', '.join(supported_pipelines())}"
    )


def family_class(name: str) -> type[ModelFamily]:
    if name not in REGISTRY:
        raise ValueError(f"model.family={name!r} is not one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def make_family(parts: Components, name: str | None = None, null_class: int | None = None) -> ModelFamily:
    """The family adapter of ``parts`` (``name``: the ``model.family`` setting, None = detect)."""
    cls = family_class(name or detect_family(parts))
    try:
        return cls(parts, null_class=null_class)
    except (AttributeError, TypeError, KeyError) as error:
        raise ValueError(
            f"model.family={cls.name!r} does not fit this model (denoiser {type(parts.denoiser).__name__}: {error}); "
            f"leave it unset to detect the family ({detect_family(parts)!r} here)"
        ) from None


def fsdp_block_classes() -> set[type]:
    """The block classes every registered family makes FSDP units (those missing from the installed diffusers are
    skipped)."""
    found = set()
    for cls in REGISTRY.values():
        for spec in cls.fsdp_blocks:
            module, _, name = spec.partition(":")
            try:
                found.add(getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError):
                continue
    return found


__all__ = [
    "FAMILIES", "FAMILY_MODULES", "REGISTRY", "ClassConditional", "Flux", "ModelFamily", "PixArtSigma", "SampleInputs",
    "Sana", "StableDiffusion", "StableDiffusion3", "StableDiffusionXL", "Unconditional", "denoise_loop",
    "detect_family", "family_class", "family_for_pipeline", "fsdp_block_classes", "guided", "make_family",
]  # fmt: skip
