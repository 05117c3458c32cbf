"""Watch a few-shot fine-tuning run for the corruption stage and keep the last checkpoint before it.

Every ``every_n_steps`` optimizer steps (plus step 0, before any update, and the end of training) the monitor
samples fixed prompts and seeds and measures, against the instance images:

- ``corruption/fidelity``: ``subject_fidelity`` (mean cosine similarity of every sample to every instance image);
  with several prompts (or labels) it is pooled over all of them, and the history and the CSV also hold each
  prompt's own, as ``fidelity: <prompt>`` (``fidelity: class 3`` for a label; not sent to the loggers);
- ``corruption/score``: mean high-frequency energy of the samples divided by that of the instance images
  (``high_frequency_energy``: share of spectral energy above half Nyquist). 1 = as much fine detail as the training
  images; the noisy patterns of the corruption stage push it up (white noise alone is ~0.8 absolute energy, a
  clean render of the shapes world 0.05-0.3). The instance energy is floored at 1e-3 so flat images do not divide
  by zero;
- ``corruption/memorisation``: mean nearest-instance similarity (``memorisation``);
- ``corruption/diversity``: mean pairwise feature distance of the samples (``diversity``);
- ``corruption/stage``: the stage code of the run so far (-1 unknown, 0 adapting, 1 corruption, 2 memorising), from
  ``classify_stages`` on the whole history; also ``corruption/best_step`` and ``corruption/detected`` (0/1).

Values go to every configured logger (``log_metrics`` directly, since they are also measured outside a training
step), to ``trainer.callback_metrics`` (so ``ModelCheckpoint(monitor="corruption/fidelity")`` works) and to a
CSV (rewritten from the history at each evaluation, so that after a resume it holds exactly the restored points;
its ``stage`` column is the current classification, which may relabel an earlier point when ``min_points`` > 1).
The history is Lightning callback state: it survives ``ckpt_path`` resumes.

Distributed runs: only rank 0 samples (the same fixed seeds on every rank would give the same images); the few
samples cost about as much as one sample-grid and the other ranks wait at one broadcast, which then hands them the
new point, so every rank holds the same history and takes the same checkpoint decision.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_ft.callbacks.periodic import PeriodicEvaluation
from lightning_ft.data.folder import list_images, load_image, to_tensor
from lightning_ft.metrics import as_backbone, diversity, features, high_frequency_energy, memorisation, subject_fidelity
from lightning_ft.metrics.backbones import model_backbones, resolve_backbone
from lightning_ft.report.stage_rules import STAGE_CODES, StageReport, classify_stages

CSV_COLUMNS = (
    "step", "fidelity", "progress", "score", "memorisation", "diversity", "hf_energy", "class_prior", "ceiling",
    "stage", "stage_code",
)  # fmt: skip
BEST_CHECKPOINT = "best_before_corruption.ckpt"
#: Prefix of the history keys and CSV columns of each prompt's own fidelity (when the monitor samples several).
PER_PROMPT = "fidelity: "


def unit_pixels(images: list, size: int) -> torch.Tensor:
    """PIL images centre-cropped to ``size`` as a float batch in [0, 1], the way samples come out of ``generate``."""
    return torch.stack([(to_tensor(im, size, True, False, None) + 1) / 2 for im in images])


class CorruptionStageMonitor(PeriodicEvaluation):
    """Sample fixed seeds during training, log fidelity / corruption / memorisation / diversity and the stage.

    Args:
        prompts: prompts to sample for text models, each drawn once per seed (default None: the datamodule's
            instance prompts, deduplicated in order; many distinct captions mean many samples per evaluation). With
            more than one, each prompt's fidelity is recorded beside the pooled one (``fidelity: <prompt>``
            columns of the CSV, keys of the history points).
        labels: class labels for class-conditional models (default None: the datamodule's, deduplicated).
        seeds: sampling seeds (default 0-7), the same at every evaluation so that curves compare like with like.
        every_n_steps: evaluation period in optimizer steps (default 50; 0 = only at step 0 and at the end).
        steps: sampler steps (default None: the model's ``sample_steps``).
        guidance_scale: classifier-free guidance (default None: the model's).
        backbone: the subject-identity backbone: ``auto`` (default: what the model declares for the ``identity``
            role, in its ``backbones`` argument or its folder's ``lightning_ft.json``, else DINO ViT-S/16 as in the
            BNN paper), a name for
            ``make_backbone`` (``dino``, ``dinov2``, ``clip``, ``package.module:function``) or a module.
        backbone_path: folder or hub id of the backbone's weights (default None: the declared or paper default).
        instance_dir: folder of the instance images (default None: the datamodule's ``dataset.images``, those of
            ``data.instance_dir``).
        csv_path: CSV of the curves (default ``<log dir>/corruption_stage.csv``).
        keep_best_checkpoint: save ``<log dir>/best_before_corruption.ckpt`` (``trainer.save_checkpoint``)
            whenever the best step before corruption moves to the step just measured (default False).
        dip, dip_mode, min_dip, noise_factor, require_noise, min_points: ``classify_stages`` rules (defaults 0.3,
            ``relative``, 0.1, 1.5, True, 1).
        memorisation_threshold: nearest-instance similarity that counts as copying (default None: halfway between
            the instance images' own leave-one-out nearest-neighbour similarity and the memorisation ceiling, the
            nearest-instance similarity of the instance images' own autoencoder round trips; with a single
            instance image, 90% of that ceiling).
        levels: measure the two levels the fidelity curve is read against, at the start of a fit, and write the
            stage rules against them (default True): ``class_prior``, the fidelity of the pretrained model's
            samples of ``class_prompt`` (what it draws for the class before it has seen the subject), and
            ``ceiling``, the fidelity of the autoencoder round trips of the held-out images (or of the instance
            images themselves: a perfect copy), which no sample can beat. ``progress`` = (fidelity - prior) /
            (ceiling - prior) is logged beside the fidelity. The printed levels line names the images the ceiling
            was measured on (``ceiling 0.956 (64 autoencoder round trips of data.heldout_dir)``).
        class_prompt: prompt of the class prior (default None: the datamodule's ``class_prompt``; without one, no
            class prior is measured).
        heldout_dir: held-out images of the subject for the ceiling (default None: the datamodule's
            ``heldout_dir``, so that the data config that names the subject names its held-out images too; without
            one, the instance images).
        verbose: print the one-line verdict at the end of training (default True).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        labels: list[int] | None = None,
        seeds: list[int] = list(range(8)),
        every_n_steps: int = 50,
        steps: int | None = None,
        guidance_scale: float | None = None,
        backbone: str | torch.nn.Module = "auto",
        backbone_path: str | None = None,
        instance_dir: str | None = None,
        csv_path: str | None = None,
        keep_best_checkpoint: bool = False,
        dip: float = 0.3,
        dip_mode: str = "relative",
        min_dip: float = 0.1,
        noise_factor: float = 1.5,
        require_noise: bool = True,
        min_points: int = 1,
        memorisation_threshold: float | None = None,
        levels: bool = True,
        class_prompt: str | None = None,
        heldout_dir: str | None = None,
        verbose: bool = True,
    ):
        self.prompts, self.labels, self.seeds = prompts, labels, list(seeds)
        self.every_n_steps, self.steps, self.guidance_scale = every_n_steps, steps, guidance_scale
        self.backbone_spec, self.backbone_path = backbone, backbone_path
        self.instance_dir, self.csv_path = instance_dir, csv_path
        self.instance_key = "data.instance_dir"  # the config key of the instance images, named in messages
        self.keep_best_checkpoint, self.verbose = keep_best_checkpoint, verbose
        self.rules = dict(
            dip=dip,
            dip_mode=dip_mode,
            min_dip=min_dip,
            noise_factor=noise_factor,
            require_noise=require_noise,
            min_points=min_points,
        )
        self.memorisation_threshold = memorisation_threshold
        self.effective_memorisation_threshold = memorisation_threshold  # set at fit start when None
        self.measure_levels, self.class_prompt, self.heldout_dir = levels, class_prompt, heldout_dir
        self.levels: dict[str, float] = {}  # class_prior, ceiling, ceiling_memorisation; kept across resumes
        self.ceiling_source: str | None = None  # what the ceiling was measured on, e.g. "5 ... of data.instance_dir"
        self.history: list[dict] = []
        self.report: StageReport | None = None
        self.saved_step: int | None = None  # step held by the best-before-corruption checkpoint
        self.best_checkpoint_path: Path | None = None
        self._reference: dict[int, tuple[torch.Tensor, float]] = {}  # image side -> (features, mean HF energy)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, csv_path=self.csv_path)

    # ------------------------------------------------------------------------------------------------ setup
    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        # trainer.log_dir broadcasts: it must be read on every rank, so it is read here once.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if self.off_for(pl_module):
            return
        self.csv_file = Path(self.csv_path) if self.csv_path else log_dir / "corruption_stage.csv"
        self.best_checkpoint_path = log_dir / BEST_CHECKPOINT
        self.instance_images = self._instance_images(trainer)
        self.conditions = self._conditions(trainer, pl_module)
        if isinstance(self.backbone_spec, str):
            declared = model_backbones(pl_module)
            self.backbone = resolve_backbone("identity", self.backbone_spec, self.backbone_path, declared)
        else:
            self.backbone = as_backbone(self.backbone_spec)
        self.backbone = self.backbone.to(pl_module.device)
        self._reference = {}
        size = pl_module.native_resolution() if hasattr(pl_module, "native_resolution") else 512
        ref, _ = self.reference(size)
        if self.measure_levels and not self.levels:  # a resumed run keeps the levels measured at its start
            measured = self._measure_levels(trainer, pl_module, size) if trainer.is_global_zero else None
            self.levels, self.ceiling_source = trainer.strategy.broadcast(measured, src=0)
        if self.memorisation_threshold is not None:
            self.effective_memorisation_threshold = self.memorisation_threshold
        elif self.effective_memorisation_threshold is None:  # not restored from a checkpoint either
            self.effective_memorisation_threshold = self._auto_memorisation_threshold(
                ref, self.levels.get("ceiling_memorisation", 1.0)
            )

    def _instance_images(self, trainer: L.Trainer) -> list:
        if self.instance_dir:
            self.instance_key = "CorruptionStageMonitor.instance_dir"
            return [load_image(f) for f in list_images(self.instance_dir, self.instance_key)]
        dataset = getattr(trainer.datamodule, "dataset", None)
        if dataset is None or not getattr(dataset, "images", None):
            raise ValueError("CorruptionStageMonitor: no instance images; pass instance_dir or use LimitedDataModule")
        self.instance_key = "data.instance_dir"
        return list(dataset.images)

    def _heldout_dir(self, trainer: L.Trainer) -> tuple[str | None, str | None]:
        """The folder of held-out subject images for the ceiling and the config key that named it: the monitor's
        own ``heldout_dir``, else the data module's (None, None when neither is set)."""
        if self.heldout_dir:
            return self.heldout_dir, "CorruptionStageMonitor.heldout_dir"
        folder = dict(getattr(trainer.datamodule, "hparams", None) or {}).get("heldout_dir")
        return (folder, "data.heldout_dir") if folder else (None, None)

    def _conditions(self, trainer: L.Trainer, pl_module):
        """What the monitor's samples are asked with (``SampleInputs``): its own prompts or labels, else the data's
        distinct captions or labels; the model's family keeps what it reads and names what is missing."""
        dataset = getattr(trainer.datamodule, "dataset", None)
        prompts = self.prompts or list(dict.fromkeys(getattr(dataset, "prompts", None) or [])) or None
        labels = self.labels or list(dict.fromkeys(getattr(dataset, "labels", None) or [])) or None
        return pl_module.family.sample_inputs(prompts, labels, 1, where="CorruptionStageMonitor (prompts or labels)")

    def reference(self, size: int) -> tuple[torch.Tensor, float]:
        """Features and mean high-frequency energy of the instance images centre-cropped to ``size`` pixels."""
        if size not in self._reference:
            images = unit_pixels(self.instance_images, size)
            feats = features(images, self.backbone)
            self._reference[size] = (feats, float(high_frequency_energy(images).mean()))
        return self._reference[size]

    @staticmethod
    def _auto_memorisation_threshold(ref: torch.Tensor, ceiling: float = 1.0) -> float:
        """Halfway from the instance images' leave-one-out nearest-neighbour similarity to ``ceiling`` (the
        nearest-instance similarity of a perfect copy); 90% of the ceiling with a single instance image."""
        if len(ref) < 2:
            return 0.9 * ceiling
        unit = torch.nn.functional.normalize(ref.float(), dim=-1)
        sim = unit @ unit.T
        sim.fill_diagonal_(-float("inf"))
        loo = float(sim.amax(dim=1).mean())
        # An autoencoder so lossy that a copy is further from its source than the instance images are from each
        # other leaves no room in between: then only a sample as close as a perfect copy counts (up to rounding).
        return loo + 0.5 * (ceiling - loo) if ceiling > loo else ceiling - 1e-4

    def _measure_levels(self, trainer: L.Trainer, pl_module, size: int) -> tuple[dict[str, float], str]:
        """The class prior (the model's class-prompt samples, measured before any update) and the ceiling (the
        autoencoder round trips of the held-out or instance images), both scored like every history point; with
        the description of what the ceiling was measured on."""
        ref, _ = self.reference(size)
        levels = {"class_prior": float("nan")}
        # Perfect copies of the instance images: the memorisation ceiling, and the fidelity ceiling too unless
        # held-out renders of the subject are given (a perfect generalisation rather than a perfect copy).
        own = features(pl_module.round_trip(unit_pixels(self.instance_images, size)), self.backbone)
        levels["ceiling_memorisation"] = memorisation(own, ref)
        folder, key = self._heldout_dir(trainer)
        if folder:
            images = [load_image(f) for f in list_images(folder, key)]
            copies = features(pl_module.round_trip(unit_pixels(images, size)), self.backbone)
        else:  # no held-out images: the ceiling is a perfect copy of the training images, and the line says so
            images, copies, key = self.instance_images, own, self.instance_key
        levels["ceiling"] = subject_fidelity(copies, ref)
        source = f"{len(images)} autoencoder round trips of {key}"
        class_prompt = self.class_prompt or dict(getattr(trainer.datamodule, "hparams", {})).get("class_prompt")
        if class_prompt and self.conditions.prompts is not None:
            with torch.random.fork_rng(devices=[]):
                prior = pl_module.generate(
                    prompts=[class_prompt] * len(self.seeds),
                    seeds=self.seeds,
                    steps=self.steps,
                    guidance_scale=self.guidance_scale,
                )
            levels["class_prior"] = subject_fidelity(features(prior, self.backbone), ref)
        rank_zero_info(
            f"lightning-ft: fidelity levels: class prior {levels['class_prior']:.3f} ({class_prompt!r}, "
            f"{len(self.seeds)} samples), ceiling {levels['ceiling']:.3f} ({source})"
        )
        return levels, source

    def progress(self, fidelity: float) -> float:
        """(fidelity - class prior) / (ceiling - class prior): 0 = what the model drew for the class before
        fine-tuning, 1 = as close as a perfect copy; NaN when a level is unknown or the span is not positive."""
        prior, ceiling = self.levels.get("class_prior", float("nan")), self.levels.get("ceiling", float("nan"))
        span = ceiling - prior
        return (fidelity - prior) / span if span == span and span > 0 else float("nan")

    # -------------------------------------------------------------------------------------- model card
    def card_metrics(self) -> list[tuple[str, str, str]]:
        """The last point's scores as (name, value, what it is), for the export's model card."""
        if not self.history:
            return []
        last = self.history[-1]
        step = last["step"]
        metrics = [("subject fidelity", f"{last['fidelity']:.3f}",
                    f"mean cosine similarity of the monitor's samples to the instance images, step {step}")]
        progress = last.get("progress")
        if progress is not None and progress == progress:
            ceiling = self.ceiling_source or "autoencoder round trips of the subject"
            metrics.append(("progress", f"{progress:.2f}", f"0 = the class prior, 1 = the ceiling ({ceiling})"))
        metrics.append(("memorisation", f"{last['memorisation']:.3f}", "mean nearest-instance similarity"))
        metrics.append(("diversity", f"{last['diversity']:.3f}", "mean pairwise feature distance of samples"))
        return metrics  # fmt: skip

    def verdict(self) -> str | None:
        """The stage report's one-line summary (None before the end of training)."""
        return self.report.summary() if self.history and self.report is not None else None

    # ----------------------------------------------------------------------------------------- measurement
    def sample(self, pl_module) -> torch.Tensor:
        inputs = self.conditions
        kwargs = {"steps": self.steps, "guidance_scale": self.guidance_scale}
        # Generators are seeded per image, but the global RNG is forked anyway so that a run's training noise
        # is the same with and without the monitor.
        with torch.random.fork_rng(devices=[]):
            seeds = [s for _ in range(len(inputs)) for s in self.seeds]
            return pl_module.generate(**inputs.each(len(self.seeds)).generate_kwargs(), seeds=seeds, **kwargs)

    def measure(self, pl_module, step: int) -> dict:
        """One history point: sample, then score against the instance images."""
        images = self.sample(pl_module)
        ref, ref_hf = self.reference(images.shape[-1])
        feats = features(images, self.backbone)
        hf = float(high_frequency_energy(images).mean())
        fidelity = subject_fidelity(feats, ref)
        return {
            "step": int(step),
            "fidelity": fidelity,
            "progress": self.progress(fidelity),
            "score": hf / max(ref_hf, 1e-3),
            "memorisation": memorisation(feats, ref),
            "diversity": diversity(feats),
            "hf_energy": hf,
            **self.fidelity_by_prompt(feats, ref),
        }

    def fidelity_by_prompt(self, feats: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
        """``{"fidelity: <prompt>": subject fidelity of that prompt's samples}`` (``fidelity: class N`` for a
        label; a prompt given twice pools its samples), in the order sampled; empty when the monitor samples a
        single prompt, whose fidelity is the pooled one. ``feats``: the samples' features in ``sample``'s order."""
        texts = [t for t in self.conditions.texts() for _ in self.seeds]
        if len(set(texts)) < 2:
            return {}
        rows: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            rows.setdefault(f"{PER_PROMPT}{text}", []).append(i)
        return {key: subject_fidelity(feats[idx], ref) for key, idx in rows.items()}

    def classify(self) -> StageReport:
        h = self.history
        threshold = self.effective_memorisation_threshold
        return classify_stages(
            [p["step"] for p in h],
            [p["fidelity"] for p in h],
            [p["score"] for p in h],
            [p["memorisation"] for p in h],
            memorisation_threshold=0.95 if threshold is None else threshold,
            levels=self._rule_levels(),
            **self.rules,
        )

    def _rule_levels(self) -> tuple[float, float] | None:
        prior, ceiling = self.levels.get("class_prior", float("nan")), self.levels.get("ceiling", float("nan"))
        return (prior, ceiling) if prior == prior and ceiling == ceiling and ceiling > prior else None

    def evaluate(self, trainer: L.Trainer, pl_module) -> None:
        step = trainer.global_step
        if any(p["step"] == step for p in self.history):
            return
        point = self.measure(pl_module, step) if trainer.is_global_zero else None
        point = trainer.strategy.broadcast(point, src=0)
        self.history.append(point)
        self.history.sort(key=lambda p: p["step"])
        self.report = self.classify()
        metrics = self._metrics(point)
        # Also in callback_metrics (every rank): ModelCheckpoint / EarlyStopping can monitor "corruption/fidelity".
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=point["step"])
            self._write_csv()
        if self.keep_best_checkpoint and self.report.best_step_before_corruption == step and self.saved_step != step:
            self.saved_step = step  # before saving, so that the checkpoint's own callback state says so
            # Every rank calls it: save_checkpoint ends with a barrier.
            trainer.save_checkpoint(self.best_checkpoint_path)

    def _metrics(self, point: dict) -> dict:
        r = self.report
        metrics = {f"corruption/{k}": point[k] for k in ("fidelity", "score", "memorisation", "diversity")}
        metrics.update({f"corruption/{k}": v for k, v in self.levels.items() if v == v})
        if point.get("progress") == point.get("progress"):
            metrics["corruption/progress"] = point["progress"]
        metrics["corruption/stage"] = STAGE_CODES[r.verdict]
        metrics["corruption/detected"] = int(r.corruption_detected)
        if r.best_step_before_corruption is not None:
            metrics["corruption/best_step"] = r.best_step_before_corruption
        return metrics

    def _write_csv(self) -> None:
        self.csv_file.parent.mkdir(parents=True, exist_ok=True)
        stages = dict(zip(self.report.steps, self.report.stages))
        tmp = self.csv_file.with_suffix(".csv.tmp")
        # Each prompt's fidelity (several prompts only) after the usual columns, in the order first recorded.
        per_prompt = list(dict.fromkeys(k for p in self.history for k in p if k.startswith(PER_PROMPT)))
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*CSV_COLUMNS, *per_prompt], restval=float("nan"))
            writer.writeheader()
            for p in self.history:
                stage = stages[p["step"]]
                levels = {k: self.levels.get(k, float("nan")) for k in ("class_prior", "ceiling")}
                writer.writerow(
                    {"progress": float("nan"), **p, **levels, "stage": stage, "stage_code": STAGE_CODES[stage]}
                )
        os.replace(tmp, self.csv_file)  # readers never see a half-written file

    # ------------------------------------------------------------------------------------------------ hooks
    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.verbose and self.report is not None and not self.off:
            rank_zero_info(f"lightning-ft: {self.report.summary()}")

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "history": [dict(p) for p in self.history],
            "saved_step": self.saved_step,
            "memorisation_threshold": self.effective_memorisation_threshold,
            "levels": dict(self.levels),
            "ceiling_source": self.ceiling_source,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = sorted((dict(p) for p in state_dict.get("history", [])), key=lambda p: p["step"])
        self.saved_step = state_dict.get("saved_step")
        # A resumed run keeps the threshold it was classified with, unless one is given explicitly.
        if self.memorisation_threshold is None:
            self.effective_memorisation_threshold = state_dict.get("memorisation_threshold")
        self.levels = dict(state_dict.get("levels", {}))
        self.ceiling_source = state_dict.get("ceiling_source")
        self.report = self.classify() if self.history else None
