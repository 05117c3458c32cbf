"""Class-conditional and unconditional denoisers: DiT (latent transformer), class-conditional and plain UNets.

Sampling runs a plain loop over the diffusers scheduler (``denoise_loop``): class-conditional UNets have no
pipeline, and ``DiTPipeline`` hard-codes ImageNet's null class (1000). A DiT still exports as a ``DiTPipeline``
folder that plain diffusers samples with guidance: when the model has fewer than 1000 classes its label table is
padded so that row 1000 is its null row (``lightning_ft.core.dit_export``), and the export's ``lightning_ft.json``
records the real class count and null class, which this family reads back.
"""

from __future__ import annotations

import torch

from lightning_ft.core.class_labels import resolve_null_class
from lightning_ft.core.components import Components
from lightning_ft.core.conditions import Condition
from lightning_ft.core.families.base import TRANSFORMER_BNN_EXCLUDE, TRANSFORMER_BNN_INCLUDE, ModelFamily
from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.core.sampling_loop import denoise_loop, guided


class ClassConditional(ModelFamily):
    """Class-conditional denoisers (DiT, UNets with ``num_class_embeds``): integer labels, a null class for
    guidance and condition dropout (the model's own null row, or ``model.null_class``)."""

    name = "class_conditional"
    pipelines = ("DiTPipeline",)
    task = "class-conditional"
    hub_task = None
    uses_null_class = True
    detect_order = 80
    fsdp_blocks = ("diffusers.models.attention:BasicTransformerBlock",)

    @classmethod
    def matches(cls, parts: Components) -> bool:
        config = getattr(parts.denoiser, "config", None)
        return not parts.text_encoders and bool(
            getattr(config, "num_class_embeds", None) or getattr(config, "num_embeds_ada_norm", None)
        )

    def __init__(self, parts: Components, null_class: int | None = None):
        record = parts.declared.get("class_labels") or {}
        given = null_class if null_class is not None else record.get("null_class")
        super().__init__(parts)
        self.null_class = resolve_null_class(parts.denoiser, given)
        self.num_classes = record.get("num_classes") or self._table_classes(parts.denoiser)
        self.is_dit = type(parts.denoiser).__name__ == "DiTTransformer2DModel"
        self.pipeline_class = "DiTPipeline" if self.is_dit and parts.vae is not None else None
        if self.is_dit:  # BNN's transformer selection (inferred, see TRANSFORMER_BNN_EXCLUDE)
            self.bnn_include, self.bnn_exclude = TRANSFORMER_BNN_INCLUDE, TRANSFORMER_BNN_EXCLUDE

    # ----------------------------------------------------------------------------------------------- inputs
    def sample_inputs(self, prompts=None, labels=None, n=None, where="generate", required=True) -> SampleInputs:
        if labels is None or len(labels) == 0:
            if not required:
                return SampleInputs(int(n or 0))
            raise ValueError(f"{where}: this class-conditional model is asked with class labels, and none were given")
        return SampleInputs.of(labels=labels)

    def retention_inputs(self, count: int, prompts=None) -> SampleInputs:
        """Every real class in turn (the source domain is all of them)."""
        if prompts is not None:
            raise ValueError(f"model.memory_prompts needs a text-conditioned model, not a {self.describe()}")
        return SampleInputs.of(labels=self.classes()).cycle(count)

    def batch_inputs(self, batch: dict, prompts_key: str = "prompts", labels_key: str = "class_labels"):
        return torch.as_tensor(batch[labels_key])

    def raw_inputs(self, inputs: SampleInputs):
        return torch.as_tensor(list(inputs.labels))

    def needs_labels(self) -> bool:
        return True

    @staticmethod
    def _table_classes(denoiser) -> int | None:
        config = denoiser.config
        return getattr(config, "num_class_embeds", None) or getattr(config, "num_embeds_ada_norm", None)

    def classes(self) -> list[int]:
        """The real classes (the null class excluded)."""
        if not self.num_classes:
            raise ValueError("cannot tell how many classes this model has")
        return [c for c in range(self.num_classes) if c != self.null_class]

    def null_inputs(self, n: int) -> torch.Tensor:
        if self.null_class is None:
            raise ValueError("this class-conditional model has no null class: set model.null_class")
        return torch.full((n,), self.null_class, dtype=torch.long)

    def with_null(self, inputs: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        if self.null_class is None:
            raise ValueError("model.condition_dropout > 0 needs a null class: set model.null_class")
        return torch.where(drop.to(inputs.device), self.null_class, inputs)

    def encode(self, module, inputs, n, geometry):
        return Condition({"class_labels": torch.as_tensor(inputs).to(module.device)}, n)

    def denoise(self, denoiser, noisy, t, cond):
        return denoiser(noisy, t, class_labels=cond.fields["class_labels"]).sample

    def build_pipeline(self, parts, scheduler):
        if self.pipeline_class is None:
            return None
        from diffusers import DiTPipeline

        return DiTPipeline(transformer=parts.denoiser, vae=parts.vae, scheduler=scheduler)

    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        labels = torch.as_tensor(list(inputs.labels))
        cond = module.encode_inputs(labels)
        uncond = module.encode_inputs(self.null_inputs(len(labels))) if self.null_class is not None else None
        scheduler = module.sampling_scheduler()
        return denoise_loop(module.parts, scheduler, seeds, steps, guided(module, cond, uncond, guidance))

    def export(self, parts, scheduler, path) -> dict:
        if self.pipeline_class is None:
            return super().export(parts, scheduler, path)
        from diffusers import DiTPipeline

        from lightning_ft.core.dit_export import dit_export_record, dit_pipeline_denoiser

        # A model loaded from such an export is padded already: row 1000 is its null row, as its own null class is.
        already = self._table_classes(parts.denoiser) == 1000
        padded = dit_pipeline_denoiser(parts.denoiser, null_class=None if already else self.null_class)
        DiTPipeline(transformer=padded, vae=parts.vae, scheduler=scheduler).save_pretrained(path)
        return {"class_labels": dit_export_record(self.num_classes, self.null_class)}


class Unconditional(ModelFamily):
    """Unconditional denoisers: a pixel-space UNet samples through ``DDIMPipeline``; a latent one through the loop."""

    name = "unconditional"
    pipelines = ("DDIMPipeline", "DDPMPipeline")
    denoiser_argument = "unet"
    detect_order = 90

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return not parts.text_encoders and type(parts.denoiser).__name__ in ("UNet2DModel", "UNet2DConditionModel")

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        self.pipeline_class = "DDIMPipeline" if parts.vae is None else None

    def build_pipeline(self, parts, scheduler):
        if self.pipeline_class is None:
            return None
        from diffusers import DDIMPipeline

        return DDIMPipeline(unet=parts.denoiser, scheduler=scheduler)

    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        if pipe is None:
            cond = Condition({}, len(seeds))
            scheduler = module.sampling_scheduler()
            return denoise_loop(module.parts, scheduler, seeds, steps, guided(module, cond, None, 1.0))
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        out = pipe(batch_size=len(seeds), generator=generators, num_inference_steps=steps, output_type="np").images
        return torch.from_numpy(out).permute(0, 3, 1, 2).float()
