"""A datamodule streaming the procedural shapes world: the source domain the embedded models are pretrained on."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_ft.data.samplers import EpochSeededRandomSampler
from lightning_ft.embedded import shapes


class ShapesDataset(Dataset):
    """``length`` deterministic renders of the shapes world; item ``i`` depends only on ``(seed, i)``.

    Items are dicts with ``pixel_values`` (float, [-1, 1], CHW), ``prompts`` (the caption) and the integer
    attribute labels of ``shapes.labels``, ``styled`` (bool), and ``class_labels`` (shape x colour, see
    ``shapes.class_label``) for class-conditional models. With ``styled_fraction`` p, a fraction p/2 of the images
    get two-tone stripes and p/2 an outline (their captions stay the plain ones): for an autoencoder that must also
    represent the few-shot targets, never for the text-to-image model whose source domain they are not.
    With ``partial_caption_fraction`` q, a fraction q of the captions leave out the colour, the background or both
    (equally likely; the image is unchanged), so a text-to-image model also learns prompts that name fewer
    attributes."""

    def __init__(
        self,
        length: int,
        seed: int = 0,
        resolution: int = 32,
        styled_fraction: float = 0.0,
        partial_caption_fraction: float = 0.0,
    ):
        for name, value in (
            ("styled_fraction", styled_fraction),
            ("partial_caption_fraction", partial_caption_fraction),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ShapesDataset: {name} must lie in [0, 1], got {value!r}")
        self.length, self.seed, self.resolution = length, seed, resolution
        self.styled_fraction, self.partial_caption_fraction = styled_fraction, partial_caption_fraction

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        spec = shapes.spec_for_index(self.seed, index)
        styled = False
        if self.styled_fraction:
            rng = np.random.default_rng((self.seed, index, 1))
            u = rng.random()
            styled = bool(u < self.styled_fraction)
            if styled:
                spec = shapes.styled(
                    spec, rng, stripes=u < self.styled_fraction / 2, outline=u >= self.styled_fraction / 2
                )
        caption = spec.caption
        if self.partial_caption_fraction:
            rng = np.random.default_rng((self.seed, index, 2))
            if rng.random() < self.partial_caption_fraction:
                keep_color, keep_background = [(False, True), (True, False), (False, False)][rng.integers(3)]
                caption = spec.partial_caption(keep_color, keep_background)
        image = shapes.render(spec, self.resolution)
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
        return {
            "pixel_values": pixels,
            "prompts": caption,
            "class_labels": shapes.class_label(spec),
            "styled": styled,
            **shapes.labels(spec),
        }


class ShapesDataModule(L.LightningDataModule):
    """Unlimited, deterministic source-domain data for pretraining and for source-domain evaluation.

    Args:
        batch_size: images per batch (default 32).
        num_train: length of one training epoch in images (default 1,000,000: pretraining is bounded by
            ``trainer.max_steps``, not by epochs).
        num_val: held-out renders for validation (default 512), drawn from a different seed.
        resolution: image side in pixels (default 32).
        seed: training stream seed (default 0); validation uses ``seed + 1``.
        num_workers: dataloader workers (default 0).
        styled_fraction: fraction of training images drawn striped or outlined (default 0.0; see ShapesDataset).
        partial_caption_fraction: fraction of training captions that leave out colour and/or background
            (default 0.0; see ShapesDataset).
    """

    def __init__(
        self,
        batch_size: int = 32,
        num_train: int = 1_000_000,
        num_val: int = 512,
        resolution: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        styled_fraction: float = 0.0,
        partial_caption_fraction: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        dataset = ShapesDataset(h.num_train, h.seed, h.resolution, h.styled_fraction, h.partial_caption_fraction)
        # StatefulDataLoader (torchdata): Lightning saves its position and sampler state in checkpoints, so a run
        # resumed mid-epoch continues with the next batch of the same order instead of restarting the epoch.
        return StatefulDataLoader(
            dataset,
            batch_size=h.batch_size,
            sampler=EpochSeededRandomSampler(len(dataset), h.seed),
            num_workers=h.num_workers,
            drop_last=True,
            persistent_workers=h.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        dataset = ShapesDataset(h.num_val, h.seed + 1, h.resolution)
        return DataLoader(dataset, batch_size=h.batch_size, num_workers=h.num_workers)
