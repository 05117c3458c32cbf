"""Watch a ControlNet learn to follow its control: the adherence curve over training and its "sudden convergence".

At the start of training (step 0, before any update), every ``every_n_steps`` optimizer steps and at the end, the
monitor samples the first ``pairs`` held-out (control, caption) pairs with fixed seeds, ``pl_module.generate(prompts,
seeds, controls=...)``, and scores each sample with ``control_iou`` (``lightning_ft.metrics.control_adherence``: the
IoU of the drawn shape with the control's silhouette). It logs ``control/iou`` (the mean over pairs) with its 95%
percentile bootstrap interval over the pairs (``control/iou_low``, ``control/iou_high``; 2,000 resamples, seeded, so
the same scores give the same interval), ``control/ceiling`` (the IoU of the autoencoder round trips of the held-out
target images: what a sample that is a perfect copy would score) and, once there is one, ``control/converged_step``.

The convergence step is inferred from the ControlNet paper's "sudden convergence" (the step at which the samples
start to follow the condition, judged there by eye; Diff-Tuning reports its speed-up of ControlNet's convergence on
that step): here, the first evaluated step whose mean IoU reaches ``threshold`` and stays at or above it at every
later evaluation; a dip below it after passing resets it. None while the last evaluation is below ``threshold``.

The held-out pairs are read from ``<heldout_dir>/captions.jsonl``, rows with ``file`` (the target image, for the
ceiling), ``caption``, ``conditioning_image`` (relative to the captions file's folder, the diffusers dataset
convention) and ``background`` (the caption's background colour as RGB 0-255, from which the drawn shape is
segmented): the layout of the embedded control target (``${embedded:control}/heldout``).

Values go to every logger (``log_metrics``: they are also measured outside a training step), to
``trainer.callback_metrics`` and to ``<log dir>/control_adherence.csv`` (rewritten from the history at each
evaluation); the history is Lightning callback state and survives ``ckpt_path`` resumes. Only rank 0 samples; the
other ranks receive each point by broadcast.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_ft.callbacks.periodic import PeriodicEvaluation
from lightning_ft.data.folder import load_image, to_tensor
from lightning_ft.metrics.control_adherence import bootstrap_interval, control_iou

CSV_COLUMNS = ("step", "iou", "iou_low", "iou_high", "pairs", "ceiling", "threshold", "converged_step")
CAPTIONS = "captions.jsonl"


def convergence_step(steps: list[int], means: list[float], threshold: float) -> int | None:
    """The first of ``steps`` (in increasing order, one mean each) from which every mean is at least ``threshold``;
    None when the last one is below it (or there is none)."""
    if len(steps) != len(means):
        raise ValueError(f"convergence_step: {len(steps)} steps but {len(means)} means")
    found = None
    for step, mean in zip(steps, means):
        if mean >= threshold:
            found = step if found is None else found
        else:
            found = None  # a dip below the threshold: not converged yet
    return found


def read_pairs(captions_file: Path, count: int, key: str) -> list[dict]:
    """The first ``count`` rows of a held-out ``captions.jsonl``, each checked for ``file``, ``caption``,
    ``conditioning_image`` and ``background``; the paths made absolute (relative to the file's folder). ``key``
    names the setting that pointed here, in errors."""
    if not captions_file.is_file():
        raise FileNotFoundError(
            f"{key}: {str(captions_file)!r} does not exist; the held-out folder needs a {CAPTIONS} with file, caption, "
            "conditioning_image and background per row (the layout of ${embedded:control}/heldout)"
        )
    rows = []
    for number, line in enumerate(captions_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{key}: {str(captions_file)!r} line {number} is not JSON ({error})") from None
        missing = [k for k in ("file", "caption", "conditioning_image", "background") if k not in row]
        if missing:
            raise ValueError(
                f"{key}: {str(captions_file)!r} line {number} has no {', '.join(missing)} (each row needs the target "
                "image, its caption, its control image and the caption's background colour as RGB 0-255)"
            )
        folder = captions_file.parent
        rows.append({**row, "file": folder / row["file"], "conditioning_image": folder / row["conditioning_image"]})
        if len(rows) == count:
            return rows
    raise ValueError(f"{key}: {str(captions_file)!r} holds {len(rows)} pairs; ControlAdherenceMonitor.pairs={count}")


class ControlAdherenceMonitor(PeriodicEvaluation):
    """Sample held-out (control, caption) pairs during training; log the mean control IoU, its interval and the
    convergence step.

    Args:
        every_n_steps: evaluation period in optimizer steps (default 50; 0 = only at step 0 and at the end).
        pairs: held-out pairs sampled per evaluation, the first of the captions file (default 32).
        seeds: one sampling seed per pair (default None: 0, 1, ..., pairs - 1), the same at every evaluation so that
            the curve compares like with like.
        threshold: mean IoU that counts as following the control, for ``convergence_step`` (default 0.6: inferred,
            about half-way between the pretrained model's level on the embedded control task, 0.24, and the
            autoencoder's ceiling, 0.98).
        heldout_dir: folder of the held-out pairs (default None: the datamodule's ``heldout_dir``, so that the data
            config that names the task names its held-out pairs too).
        captions_file: the pairs' rows (default None: ``<heldout_dir>/captions.jsonl``).
        steps, guidance_scale: sampler settings (default None: the model's).
        level: the interval's confidence (default 0.95).
        ceiling: measure the IoU of the autoencoder round trips of the held-out images at the start of a fit
            (default True).
        csv_path: CSV of the curve (default ``<log dir>/control_adherence.csv``).
        verbose: print the levels at the start and the convergence line at the end (default True).
    """

    reads_controls = True  # samples with control images: stays on for a model with a ControlNet

    def __init__(
        self,
        every_n_steps: int = 50,
        pairs: int = 32,
        seeds: list[int] | None = None,
        threshold: float = 0.6,
        heldout_dir: str | None = None,
        captions_file: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        level: float = 0.95,
        ceiling: bool = True,
        csv_path: str | None = None,
        verbose: bool = True,
    ):
        if pairs < 1:
            raise ValueError(f"ControlAdherenceMonitor.pairs={pairs}: needs at least one pair")
        if seeds is not None and len(seeds) != pairs:
            raise ValueError(
                f"ControlAdherenceMonitor.seeds: {len(seeds)} seeds for pairs={pairs}; give one seed per pair"
            )
        if not 0 < level < 1:
            raise ValueError(f"ControlAdherenceMonitor.level={level}: a confidence must be in (0, 1)")
        self.every_n_steps, self.pairs = every_n_steps, pairs
        self.seeds = list(seeds) if seeds is not None else list(range(pairs))
        self.threshold, self.heldout_dir, self.captions_file = threshold, heldout_dir, captions_file
        self.steps, self.guidance_scale, self.level = steps, guidance_scale, level
        self.measure_ceiling, self.csv_path, self.verbose = ceiling, csv_path, verbose
        self.levels: dict[str, float] = {}  # ceiling; kept across resumes
        self.history: list[dict] = []
        self.rows: list[dict] | None = None
        self.controls: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, csv_path=self.csv_path)

    # ------------------------------------------------------------------------------------------------ setup
    def _source(self, trainer: L.Trainer) -> tuple[Path, str]:
        """The captions file of the held-out pairs and the setting that named it."""
        if self.captions_file:
            return Path(self.captions_file), "ControlAdherenceMonitor.captions_file"
        if self.heldout_dir:
            return Path(self.heldout_dir) / CAPTIONS, "ControlAdherenceMonitor.heldout_dir"
        folder = dict(getattr(trainer.datamodule, "hparams", None) or {}).get("heldout_dir")
        if not folder:
            raise ValueError(
                "ControlAdherenceMonitor: no held-out pairs; set data.heldout_dir (a folder with a captions.jsonl of "
                "file, caption, conditioning_image and background rows, e.g. ${embedded:control}/heldout) or "
                "ControlAdherenceMonitor.heldout_dir"
            )
        return Path(folder) / CAPTIONS, "data.heldout_dir"

    @staticmethod
    def _resolution(trainer: L.Trainer, pl_module) -> int:
        datamodule = getattr(trainer, "datamodule", None)
        side = getattr(datamodule, "sampling_resolution", None)
        if side is None:
            side = dict(getattr(datamodule, "hparams", None) or {}).get("resolution")
            side = max(side) if isinstance(side, list | tuple) else side
        if side is None and hasattr(pl_module, "native_resolution"):
            side = pl_module.native_resolution()
        return int(side or 512)

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if getattr(pl_module, "controlnet", False) is None:  # a model without one: its generate refuses controls
            raise ValueError(
                "ControlAdherenceMonitor measures a ControlNet: the model has none (set model.trainable='controlnet')"
            )
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # broadcasts: read on every rank
        self.csv_file = Path(self.csv_path) if self.csv_path else log_dir / "control_adherence.csv"
        captions_file, key = self._source(trainer)
        self.rows = read_pairs(captions_file, self.pairs, key)
        size = self._resolution(trainer, pl_module)
        self.controls = self._pixels([r["conditioning_image"] for r in self.rows], size)
        self.backgrounds = [r["background"] for r in self.rows]
        self.prompts = [str(r["caption"]) for r in self.rows]
        if self.measure_ceiling and "ceiling" not in self.levels:  # a resumed run keeps the level of its start
            ceiling = self._ceiling(pl_module, size) if trainer.is_global_zero else None
            self.levels["ceiling"] = trainer.strategy.broadcast(ceiling, src=0)
            if self.verbose:
                rank_zero_info(
                    f"lightning-ft: control adherence: ceiling {self.levels['ceiling']:.3f} (IoU of {len(self.rows)} "
                    f"autoencoder round trips of the held-out images of {key}), threshold {self.threshold:.2f}"
                )

    @staticmethod
    def _pixels(files: list[Path], size: int) -> torch.Tensor:
        """Images centre-cropped to ``size`` as a float batch (N, 3, size, size) in [0, 1]."""
        return torch.stack([(to_tensor(load_image(f), size, True, False, None) + 1) / 2 for f in files])

    def _ceiling(self, pl_module, size: int) -> float:
        images = self._pixels([r["file"] for r in self.rows], size)
        copies = pl_module.round_trip(images) if hasattr(pl_module, "round_trip") else images
        return float(control_iou(copies, self.controls, self.backgrounds).mean())

    # ----------------------------------------------------------------------------------------- measurement
    def sample(self, pl_module) -> torch.Tensor:
        """The held-out pairs' samples (N, 3, H, W) in [0, 1]. The global RNG is forked so that a run's training
        noise is the same with and without the monitor."""
        with torch.random.fork_rng(devices=[]):
            return pl_module.generate(
                prompts=self.prompts,
                seeds=self.seeds,
                controls=self.controls,
                steps=self.steps,
                guidance_scale=self.guidance_scale,
            )

    def measure(self, pl_module, step: int) -> dict:
        """One history point: sample, score every pair, summarise."""
        ious = control_iou(self.sample(pl_module), self.controls, self.backgrounds)
        mean, low, high = bootstrap_interval(ious, self.level)
        return {"step": int(step), "iou": mean, "iou_low": low, "iou_high": high, "pairs": len(ious),
                "ious": [round(float(v), 6) for v in ious]}  # fmt: skip

    def convergence_step(self) -> int | None:
        """The first evaluated step from which the mean IoU stays at or above ``threshold`` (None if none)."""
        return convergence_step([p["step"] for p in self.history], [p["iou"] for p in self.history], self.threshold)

    def evaluate(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if any(p["step"] == step for p in self.history):
            return  # measured already (the end of a run whose last step was periodic, or a resume)
        point = self.measure(pl_module, step) if trainer.is_global_zero else None
        point = trainer.strategy.broadcast(point, src=0)
        self.history.append(point)
        self.history.sort(key=lambda p: p["step"])
        metrics = {f"control/{k}": point[k] for k in ("iou", "iou_low", "iou_high")}
        metrics.update({f"control/{k}": v for k, v in self.levels.items() if v is not None})
        converged = self.convergence_step()
        if converged is not None:
            metrics["control/converged_step"] = converged
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=point["step"])
            self._write_csv()

    def _write_csv(self) -> None:
        self.csv_file.parent.mkdir(parents=True, exist_ok=True)
        converged = self.convergence_step()
        tmp = self.csv_file.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for p in self.history:
                ceiling = self.levels.get("ceiling")
                writer.writerow({**p, "ceiling": "" if ceiling is None else ceiling, "threshold": self.threshold,
                                 "converged_step": "" if converged is None else converged})  # fmt: skip
        os.replace(tmp, self.csv_file)  # readers never see a half-written file

    # -------------------------------------------------------------------------------------- model card
    def summary(self) -> str | None:
        """One line: the convergence step and the last point (None before the first evaluation)."""
        if not self.history:
            return None
        last, converged = self.history[-1], self.convergence_step()
        when = (
            f"converged at step {converged} (mean IoU >= {self.threshold:.2f} from then on)"
            if converged is not None
            else f"not converged (mean IoU below {self.threshold:.2f} at step {last['step']})"
        )
        ceiling = self.levels.get("ceiling")
        of = f", ceiling {ceiling:.3f}" if ceiling is not None else ""
        return (f"control adherence {when}; IoU {last['iou']:.3f} [{last['iou_low']:.3f}, {last['iou_high']:.3f}] "
                f"at step {last['step']} over {last['pairs']} held-out pairs{of}")  # fmt: skip

    def card_metrics(self) -> list[tuple[str, str, str]]:
        """The last point and the convergence step as (name, value, what it is), for the export's model card."""
        if not self.history:
            return []
        last, converged = self.history[-1], self.convergence_step()
        interval = f"{last['iou']:.3f} [{last['iou_low']:.3f}, {last['iou_high']:.3f}]"
        what = (f"mean IoU of the drawn shape with the control's silhouette over {last['pairs']} held-out pairs, step "
                f"{last['step']}; {round(100 * self.level)}% bootstrap interval over the pairs")  # fmt: skip
        metrics = [("control adherence (IoU)", interval, what)]
        ceiling = self.levels.get("ceiling")
        if ceiling is not None:
            metrics.append(("control IoU ceiling", f"{ceiling:.3f}", "autoencoder round trips of the held-out images"))
        metrics.append(("control convergence step", "none" if converged is None else str(converged),
                        f"first evaluation from which the mean IoU stays >= {self.threshold:.2f}"))  # fmt: skip
        return metrics

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.verbose and self.history:
            rank_zero_info(f"lightning-ft: {self.summary()}")

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"history": [dict(p) for p in self.history], "levels": dict(self.levels)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = sorted((dict(p) for p in state_dict.get("history", [])), key=lambda p: p["step"])
        self.levels = dict(state_dict.get("levels", {}))
