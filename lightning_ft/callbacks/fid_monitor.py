"""FID and KID over training: sample a bounded number of images every N steps and score them against a reference set.

The reference features are computed once per (backbone, reference files) and cached on disk, so repeated runs and
resumed runs do not re-extract 2,000 images. Scores use ``lightning_ft.metrics.FIDScorer`` (torchmetrics FID and KID
with a custom feature module): the embedded feature network by default, Inception or a local CLIP by config. The
number of samples and of reference images is logged beside every score, since FID and KID are biased by both.

Logged as ``fid/fid``, ``fid/kid`` (x1000 in ``fid/kid_x1000``), ``fid/num_samples``, ``fid/num_reference`` to every
logger and to ``trainer.callback_metrics`` (``ModelCheckpoint(monitor="fid/fid", mode="min")`` keeps the best step).
Only rank 0 samples and scores; the other ranks receive the values by broadcast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_ft.callbacks.periodic import PeriodicEvaluation
from lightning_ft.data.folder import list_images, load_image, to_tensor
from lightning_ft.metrics import FIDScorer
from lightning_ft.metrics.backbones import backbone_spec, make_backbone, model_backbones
from lightning_ft.paths import cache_dir


class FIDMonitor(PeriodicEvaluation):
    """FID/KID of ``num_samples`` samples against ``reference_dir`` every ``every_n_steps`` steps (and at the end).

    Args:
        reference_dir: folder of reference images (default None: the datamodule's ``heldout_dir``, held-out images
            of the target that the data config names; without one, the training images of ``data.instance_dir``,
            with a warning: FID against a few training images is mostly bias and rewards copying them).
        num_samples: images sampled per evaluation (default 64): the cost bound.
        max_reference: at most this many reference images, the first in sorted order (default 2000).
        every_n_steps: evaluation period (default 250; 0 = only at the end); also at step 0 when ``at_start``.
        at_start: evaluate before the first update too (default True: the pretrained model's score is the baseline).
        prompts, labels: conditions cycled over the samples (default: the datamodule's captions or labels, cycled).
        steps, guidance_scale: sampler settings (default: the model's).
        backbone: ``auto`` (default: what the model declares for the ``fid`` role, in its ``backbones`` argument
            or its folder's ``lightning_ft.json``, else ``inception``), or a name for ``make_backbone``
            (``inception``, ``clip``, ``dinov2``, ``package.module:function``); ``backbone_path`` for its weights.
        resolution: side the reference images are resized and centre-cropped to (default: the datamodule's).
        cache: keep reference features on disk (default True).
    """

    def __init__(
        self,
        reference_dir: str | None = None,
        num_samples: int = 64,
        max_reference: int = 2000,
        every_n_steps: int = 250,
        at_start: bool = True,
        prompts: list[str] | None = None,
        labels: list[int] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        backbone: str = "auto",
        backbone_path: str | None = None,
        resolution: int | None = None,
        cache: bool = True,
    ):
        if num_samples < 2:
            raise ValueError(f"FIDMonitor: num_samples={num_samples}; FID/KID need at least 2 samples")
        self.reference_dir, self.num_samples, self.max_reference = reference_dir, num_samples, max_reference
        self.every_n_steps, self.at_start = every_n_steps, at_start
        self.prompts, self.labels, self.steps, self.guidance_scale = prompts, labels, steps, guidance_scale
        self.backbone_name, self.backbone_path, self.resolution, self.cache = backbone, backbone_path, resolution, cache
        self.scorer: FIDScorer | None = None
        self.reference_key: str | None = None  # the config key that named the reference images
        self.history: list[dict] = []

    # --------------------------------------------------------------------------------------------- reference
    def _reference_files(self, trainer: L.Trainer) -> list[Path]:
        """The reference images: the monitor's ``reference_dir``, else the data's ``heldout_dir``, else (with one
        warning) the training images; ``reference_key`` records which."""
        data = dict(getattr(trainer.datamodule, "hparams", None) or {})
        given = ((self.reference_dir, "FIDMonitor.reference_dir"), (data.get("heldout_dir"), "data.heldout_dir"))
        for folder, key in given:
            if folder:
                self.reference_key = key
                return list_images(folder, key)[: self.max_reference]
        if data.get("instance_dir") is None:
            raise ValueError(
                "FIDMonitor: no reference images; set data.heldout_dir (held-out images of the target) or "
                "FIDMonitor.reference_dir"
            )
        self.reference_key = "data.instance_dir"
        files = list_images(data["instance_dir"], "data.instance_dir")[: self.max_reference]
        # Scored anyway rather than skipped: the curve still shows the samples moving towards the target, and a
        # ModelCheckpoint(monitor: fid/fid) keeps working; the warning says what the number is worth.
        rank_zero_warn(
            f"FIDMonitor: no held-out reference images (data.heldout_dir and FIDMonitor.reference_dir are unset): "
            f"FID/KID are scored against the {len(files)} training images of data.instance_dir, which is mostly "
            "bias with few images and rewards copying them; set data.heldout_dir to images of the target that are "
            "not trained on"
        )
        return files

    def reference_features(self, files: list[Path], resolution: int) -> torch.Tensor:
        """Backbone features of the reference images, from the on-disk cache when the same files were seen."""
        stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        key = json.dumps([*self.resolved_backbone, resolution, stamp])
        cached = cache_dir() / "fid_reference" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        if self.cache and cached.exists():
            return torch.load(cached)
        images = torch.stack([to_tensor(load_image(f), resolution, True, False, None) for f in files])
        feats = FIDScorer(self.scorer.backbone).set_reference((images + 1) / 2).reference
        if self.cache:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            torch.save(feats, tmp)
            tmp.replace(cached)  # atomic: a concurrent or killed run never reads half a file
        return feats

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self.off_for(pl_module):
            return
        name, path = backbone_spec("fid", self.backbone_name, self.backbone_path, model_backbones(pl_module))
        self.resolved_backbone = (name, path)
        self.scorer = FIDScorer(make_backbone(name, path))
        # The data's sampling side (LimitedDataModule: the largest of several resolutions), else its resolution.
        datamodule = trainer.datamodule
        data_side = getattr(datamodule, "sampling_resolution", None) or dict(getattr(datamodule, "hparams", {})).get(
            "resolution"
        )
        resolution = self.resolution or data_side or pl_module.native_resolution()
        self.scorer.set_reference(self.reference_features(self._reference_files(trainer), resolution))

    # ------------------------------------------------------------------------------------------------ scoring
    def _conditions(self, trainer: L.Trainer, pl_module) -> dict:
        """``generate``'s inputs for ``num_samples`` samples: the monitor's or the data's prompts or labels, cycled
        (the model's family keeps what it reads; a text model with no prompts anywhere gets the empty prompt)."""
        dataset = getattr(trainer.datamodule, "dataset", None)
        prompts = self.prompts or list(getattr(dataset, "prompts", None) or [""])
        labels = self.labels or list(getattr(dataset, "labels", None) or [0])
        inputs = pl_module.family.sample_inputs(prompts, labels, self.num_samples, where="FIDMonitor")
        return inputs.cycle(self.num_samples).generate_kwargs()

    def card_metrics(self) -> list[tuple[str, str, str]]:
        """The last FID/KID with their sample counts, for the export's model card."""
        if not self.history:
            return []
        last = self.history[-1]
        of = f" of {self.reference_key}" if self.reference_key else ""
        counts = f"{last['num_samples']} samples vs {last['num_reference']} reference images{of}, step {last['step']}"
        return [("FID", f"{last['fid']:.2f}", counts), ("KID x 1000", f"{last['kid_x1000']:.2f}", counts)]

    def evaluate(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if any(p["step"] == step for p in self.history):
            return
        point = None
        if trainer.is_global_zero:
            samples = pl_module.generate(
                **self._conditions(trainer, pl_module),
                seeds=list(range(self.num_samples)),
                steps=self.steps,
                guidance_scale=self.guidance_scale,
            )
            scores = self.scorer.score(samples)
            point = {"step": step, "fid": scores["fid"], "kid_x1000": 1000 * scores["kid_mean"],
                     "num_samples": scores["n_fake"], "num_reference": scores["n_real"]}  # fmt: skip
        point = trainer.strategy.broadcast(point, src=0)
        self.history.append(point)
        metrics = {f"fid/{k}": v for k, v in point.items() if k != "step"}
        metrics["fid/kid"] = point["kid_x1000"] / 1000
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def state_dict(self) -> dict:
        return {"history": [dict(p) for p in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(p) for p in state_dict.get("history", [])]
