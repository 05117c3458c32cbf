"""Prompt fidelity: CLIP-T, the cosine similarity between a sample's CLIP image embedding and the CLIP text
embedding of its prompt (the score DreamBooth and BNN papers report beside DINO / CLIP-I)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ft.metrics.backbones import DEFAULT_CHECKPOINTS, CLIPPreprocess, clip_normalisation, load_pretrained
from lightning_ft.metrics.images import as_float_images


class CLIPTextScore:
    """CLIP-T of images against their prompts, with a full CLIP model (vision and text towers) and its tokenizer.

    Args:
        path: a local folder written by ``save_pretrained`` holding a ``CLIPModel`` and its tokenizer, or a hub id
            (default: ``DEFAULT_CHECKPOINTS["clip"]``, the paper's ViT-L/14; offline, give a local folder).
        device: where the model runs (default ``"cpu"``).
        batch_size: images / prompts per forward (default 64).

    Images are CLIP-preprocessed like the ``clip`` metric backbone (``CLIPPreprocess``, the folder's
    ``preprocessor_config.json`` mean / std when present). Usage: ``CLIPTextScore(folder)(images, prompts)``.
    """

    name = "clip"

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 64):
        from transformers import AutoTokenizer, CLIPModel

        self.path = str(path) if path else DEFAULT_CHECKPOINTS["clip"]
        self.batch_size = batch_size
        self.model = load_pretrained(CLIPModel, self.path, "clip (CLIP-T)").eval().requires_grad_(False).to(device)
        self.tokenizer = load_pretrained(AutoTokenizer, self.path, "clip (CLIP-T) tokenizer")
        config = self.model.config
        self.preprocess = CLIPPreprocess(config.vision_config.image_size, *clip_normalisation(self.path)).to(device)
        # A tokenizer without a model_max_length reports a huge one: never exceed the text tower's positions.
        self.max_length = min(self.tokenizer.model_max_length, config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # The projections are applied here rather than through get_image_features / get_text_features: those return a
    # tensor in transformers 4 and an output object (projected pooler_output) in transformers 5.
    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings (N, projection_dim) of images in [0, 1] (N, 3, H, W) (or uint8)."""
        x = self.preprocess(as_float_images(images).to(self.device))
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """L2-normalised CLIP text embeddings (N, projection_dim) of ``prompts`` (truncated to the text tower)."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = self.model.text_model(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Cosine similarity of each image with its own prompt, (N,) float32 on the model's device."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, one per image, not a single string")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if len(prompts) == 0:
            return torch.zeros(0, device=self.device)
        step = self.batch_size
        return torch.cat(
            [
                (self.image_embeddings(images[i : i + step]) * self.text_embeddings(prompts[i : i + step])).sum(-1)
                for i in range(0, len(prompts), step)
            ]
        )

    def __call__(self, images: Tensor, prompts: list[str]) -> dict[str, float]:
        """``{"clip_t": mean cosine of each image with its prompt (NaN for no images), "n": N}``."""
        cosines = self.scores(images, prompts)
        return {"clip_t": float(cosines.mean()) if len(cosines) else float("nan"), "n": len(cosines)}
