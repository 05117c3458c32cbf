"""Sample a fixed grid of images during training and write it to disk and to the logger."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

#: Rows a grid takes from the data's own captions or labels when no prompts are set: each row costs one sample per
#: seed at every grid, and a captioned domain has as many distinct captions as images.
MAX_DATA_ROWS = 4
#: Beside the grids: their row texts (prompt, ``class N`` or empty) and seeds, as JSON.
ROWS_FILE = "rows.json"


def data_rows(datamodule) -> tuple[list[str] | None, list[int] | None]:
    """The prompts and labels a grid shows when it names none: the datamodule's ``sample_prompts`` /
    ``sample_labels``, else its first ``MAX_DATA_ROWS`` distinct instance captions (and its class prompt, so the
    grid shows what prior preservation keeps) / labels; None for what the data does not give."""
    hparams = dict(getattr(datamodule, "hparams", None) or {})
    dataset = getattr(datamodule, "dataset", None)
    prompts = hparams.get("sample_prompts")
    if prompts is None:
        captions = list(dict.fromkeys(getattr(dataset, "prompts", None) or []))[:MAX_DATA_ROWS]
        class_prompt = hparams.get("class_prompt")
        if captions and class_prompt and class_prompt not in captions:
            captions.append(class_prompt)
        prompts = captions or None
    labels = hparams.get("sample_labels")
    if labels is None:
        labels = list(dict.fromkeys(getattr(dataset, "labels", None) or []))[:MAX_DATA_ROWS] or None
    return (list(prompts) if prompts is not None else None, list(labels) if labels is not None else None)


def make_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] to one uint8 HxWx3 grid of ``columns`` columns (empty cells stay black)."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.zeros(c, rows * h, columns * w)
    for i, image in enumerate(images):
        r, k = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = image
    return (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def save_grid(images: torch.Tensor, path: str | Path, columns: int, upscale: int = 4) -> np.ndarray:
    """Write ``make_grid(images, columns)`` as a PNG, enlarged ``upscale`` times (nearest); returns the grid."""
    grid = make_grid(images, columns)
    if upscale > 1:
        grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
    Image.fromarray(grid).save(path)
    return grid


class SampleGridLogger(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training) sample ``prompts`` (or ``labels``)
    with fixed ``seeds`` and save ``samples/step_XXXXXX.png`` under the log dir; TensorBoard and W&B loggers also
    receive the grid.

    The rows are the data's unless the grid names its own: a recipe holds no data-specific prompts, the data
    config gives them (``data.sample_prompts``), so that replacing the data replaces what the grids show.

    Args:
        prompts: prompts to sample (text models); each is drawn once per seed (default None: the datamodule's
            ``sample_prompts``, else its first 4 distinct instance captions and its class prompt; ``[]``: one row
            asked with nothing, for a method that samples from its own inputs, as ANL from its reference images).
        labels: class labels to sample (class-conditional models), instead of prompts (default None: the
            datamodule's ``sample_labels``, else its first 4 distinct labels).
        seeds: sampling seeds (default [0, 1, 2, 3]); the same every time, so grids compare across steps.
        every_n_steps: sampling period in optimizer steps (default 100; 0 = only at the end).
        steps: sampler steps (default: the model's ``sample_steps``).
        guidance_scale: classifier-free guidance (default: the model's).
        upscale: nearest-neighbour enlargement of the saved grid (default 4), for small models.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        labels: list[int] | None = None,
        seeds: list[int] = [0, 1, 2, 3],
        every_n_steps: int = 100,
        steps: int | None = None,
        guidance_scale: float | None = None,
        upscale: int = 4,
    ):
        self.prompts, self.labels, self.seeds = prompts, labels, list(seeds)
        self.every_n_steps, self.steps, self.guidance_scale, self.upscale = (
            every_n_steps,
            steps,
            guidance_scale,
            upscale,
        )
        self._last_step = -1

    def grid_inputs(self, pl_module, trainer: L.Trainer | None = None):
        """What each row of the grid is asked with (``SampleInputs``, one per row): the grid's prompts or labels,
        else the data's (``trainer``'s datamodule, default the one ``pl_module`` is fitted with); the model's family
        keeps the prompts or labels it reads; with neither, one row asked with nothing (an unconditional model)."""
        trainer = trainer or getattr(pl_module, "_trainer", None)
        prompts, labels = data_rows(getattr(trainer, "datamodule", None))
        prompts = self.prompts if self.prompts is not None else prompts
        labels = self.labels if self.labels is not None else labels
        rows = pl_module.family.sample_inputs(prompts, labels, 1, where="SampleGridLogger", required=False)
        if getattr(pl_module, "controlnet", None) is not None:
            # A ControlNet's rows: the data's validation pairs (data.validation_images with data.sample_prompts).
            datamodule = getattr(trainer, "datamodule", None)
            controls = datamodule.sample_controls() if hasattr(datamodule, "sample_controls") else None
            if controls is None or len(controls) != len(rows):
                raise ValueError("SampleGridLogger: a ControlNet's grid needs data.validation_images, one control "
                                 "image per data.sample_prompts row")  # fmt: skip
            rows = pl_module.family.with_controls(rows, controls, True)
        elif pl_module.family.needs_source:
            # An editing model's rows: the data's validation pairs (data.validation_images: the source images), else
            # the sources of the first training images.
            datamodule = getattr(trainer, "datamodule", None)
            sources = datamodule.sample_sources(len(rows)) if hasattr(datamodule, "sample_sources") else None
            if sources is None or len(sources) != len(rows):
                raise ValueError("SampleGridLogger: an editing model's grid needs source images: "
                                 "data.validation_images, one per data.sample_prompts row, or the data's")  # fmt: skip
            rows = pl_module.family.with_sources(rows, sources)
        return rows

    def sample(self, pl_module, rows=None) -> torch.Tensor:
        rows = rows if rows is not None else self.grid_inputs(pl_module)
        seeds = [s for _ in range(len(rows)) for s in self.seeds]
        kwargs = rows.each(len(self.seeds)).generate_kwargs()
        return pl_module.generate(**kwargs, seeds=seeds, steps=self.steps, guidance_scale=self.guidance_scale)

    def log_grid(self, trainer: L.Trainer, pl_module) -> Path | None:
        step = trainer.global_step
        if step == self._last_step:
            return None
        self._last_step = step
        # trainer.log_dir is a collective call under DDP: every rank reads it, before rank 0 goes on alone.
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        rows = self.grid_inputs(pl_module, trainer)
        images = self.sample(pl_module, rows)
        if not trainer.is_global_zero:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step:06d}.png"
        columns = len(self.seeds)
        if rows.images is not None:  # each row starts with its control or source image: control | samples
            per_row = images.view(len(rows), columns, *images.shape[1:])
            controls = torch.stack(list(rows.images)).to(images)[:, None]
            if controls.shape[-2:] != images.shape[-2:]:
                size = tuple(images.shape[-2:])
                controls = torch.nn.functional.interpolate(controls[:, 0], size=size, mode="bilinear")[:, None]
            images, columns = torch.cat([controls, per_row], dim=1).flatten(0, 1), columns + 1
        grid = save_grid(images, path, columns=columns, upscale=self.upscale)
        # The rows may come from the data, not the config: written beside the grids for whoever labels them.
        (folder / ROWS_FILE).write_text(json.dumps({"rows": rows.texts(), "seeds": self.seeds}, indent=1) + "\n")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="samples", images=[grid], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("samples", grid, step, dataformats="HWC")
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.log_grid(trainer, pl_module)
