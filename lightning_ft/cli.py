"""``FineTuneCLI``: LightningCLI that does what its command line says, checks it first, and leaves no debris.

Differences from ``LightningCLI``, each for a way a run could otherwise silently do something else:

- ``--ckpt_path``: the config and the command line win. LightningCLI parses the checkpoint's hyperparameters over the
  command line (its ``_parse_ckpt_path``), which resumed another method, trainable set or learning rate than the one
  asked for; here the checkpoint is only read and checked (``core/resume.py``): another method, trainable set or
  weight shape is refused naming both sides, and the settings that differ are printed and applied.
  ``--ckpt_path last`` is the newest ``last.ckpt`` of any earlier run under ``trainer.default_root_dir`` (Lightning
  looks in the new run's own, empty, folder); a missing file or one that is not a checkpoint fails at once.
- Checks before anything is written: ``fit`` with ``trainer.max_steps 0`` (nothing trained, the pretrained model
  exported as the result) or nothing left to train after the checkpoint's step; the data folder and every image;
  no ``data.instance_dir`` (an experiment run without its data config: the message names them), before the model
  loads.
- A run that fails before it wrote a checkpoint removes what it created (version folder, ``config.yaml``,
  ``hparams.yaml``, ``metrics.csv``); files of earlier runs are never touched.
- Every ``fit`` writes a run report (``lightning_ft.callbacks.RunReport``: ``report.html`` in the run folder, and
  what the fit cost); ``--report false`` leaves it out, and a config that lists a ``RunReport`` keeps its settings.
- Every ``fit`` stops on SIGTERM or SIGINT at the next step boundary with a ``last.ckpt`` that ``--ckpt_path last``
  resumes bitwise (``lightning_ft.callbacks.GracefulStop``), and the process exits with 128 + the signal's number
  (143, 130), not Lightning's 0; the run report marks the run interrupted and nothing is exported.
- Negative numbers are values: ``--model.lr -1e-4`` (argparse takes ``-1e-4`` for an option, which only
  ``--model.lr=-1e-4`` avoided).
- The precision Lightning runs is checked against the config's: ``16-mixed`` on a CPU runs as ``bf16-mixed``; a
  warning names both and ``run_cost.json`` records the one that ran (``config.yaml`` keeps what was asked).
- ``--checkpoint_every N`` sets ``every_n_train_steps`` of the config's ``ModelCheckpoint``: the dotted form
  ``--trainer.callbacks.every_n_train_steps`` reaches only the last callback of the list.
- The project's methods, data modules and callbacks are imported, so short names work: ``--model.help DreamBooth``,
  ``--data.help LimitedDataModule``, ``--model DreamBooth``.
- The progress bar reads ``Epoch 2`` instead of Lightning's ``Epoch 2/-2`` when the run is bounded by steps.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_ft.callbacks.export import DiffusersExport
from lightning_ft.callbacks.graceful_stop import GracefulStop
from lightning_ft.callbacks.run_report import RunReport
from lightning_ft.core.resume import check_checkpoint_fits, describe_changes, read_checkpoint
from lightning_ft.data.datamodule import MISSING_INSTANCE_DIR
from lightning_ft.report.cost import precision_name

#: How jsonargparse's wrapping of an exception raised in a constructor starts.
JSONARGPARSE_WRAPPERS = ("Does not validate against any of the Union subtypes", "Problem with given class_path")
#: Values of ``--ckpt_path`` that Lightning resolves itself.
LIGHTNING_CKPT_NAMES = ("best", "hpc", "registry")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class FineTuneArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, with negative numbers read as values.

    argparse decides whether a word starting with ``-`` is an option with a pattern that knows ``-1`` and ``-0.5``
    but not ``-1e-4`` (Python 3.11's ``_negative_number_matcher``): ``--model.lr -1e-4`` failed with "argument
    --model: expected one argument". A word that Python reads as a number is a value here (no option of these
    parsers looks like a number); jsonargparse overrides the same method to map ``--model.lr`` to ``--model``."""

    def _parse_optional(self, arg_string):
        if arg_string.startswith("-") and arg_string not in self._option_string_actions and _is_number(arg_string):
            return None  # positional: the value of the option before it
        return super()._parse_optional(arg_string)


class StepsProgressBar(RichProgressBar):
    """Lightning's rich bar, whose epoch count reads ``Epoch 2/-2`` when ``max_epochs`` is -1 (a run bounded by
    ``max_steps``): show the total only when there is one. It shows the latest step's training loss from the
    module's ``last_loss_parts`` (the module logs ``train/loss`` only on the logger's steps), and redraws during
    training at most every ``redraw_seconds`` (and on the last step): Lightning's redraws the whole display twice
    on every batch, about 1 ms a step (docs/performance.md), for more frames than a terminal shows."""

    def __init__(self, redraw_seconds: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.redraw_seconds, self._drawn_at = redraw_seconds, float("-inf")
        self.clock = time.monotonic

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self.clock()
        last = batch_idx + 1 >= trainer.num_training_batches or 0 < trainer.max_steps <= trainer.global_step
        if not last and now - self._drawn_at < self.redraw_seconds:
            return  # the next drawn batch sets the count (Lightning's bar sets it, it does not add to it)
        self._drawn_at = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        latest = getattr(pl_module, "last_loss_parts", {}).get("loss")
        if latest is not None and trainer.training:
            metrics["train/loss"] = f"{float(latest):.3f}"
        return metrics

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs is not None and epochs > 0 else "")
        if len(self.validation_description) > len(text):  # as Lightning pads: no flicker against "Validation"
            text = f"{text:{len(self.validation_description)}}"
        return text


def _logger_dirs(logger_config) -> list[Path]:
    entries = logger_config if isinstance(logger_config, list) else [logger_config]
    dirs = []
    for entry in entries:
        init = getattr(entry, "init_args", None) if entry not in (None, True, False) else None
        save_dir = init.get("save_dir") if init is not None else None
        if save_dir:
            dirs.append(Path(save_dir))
    return dirs


def find_last_checkpoint(roots: list[Path]) -> Path | None:
    """The newest ``last.ckpt`` under ``roots`` (any version folder of any earlier run), or None."""
    found = {p for root in roots if root.is_dir() for p in root.rglob("last.ckpt") if p.is_file()}
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _unwrap_union_error(error: Exception) -> Exception:
    """The error a module's constructor raised, out of jsonargparse's wrapping: the model and data are typed
    ``LightningModule | None``, and jsonargparse reports a failed instantiation as a dump of every Union member tried,
    with the message that names the culprit buried inside."""
    while str(error).startswith(JSONARGPARSE_WRAPPERS):
        if error.__cause__ is None:
            break
        error = error.__cause__
    return error


class RunFiles:
    """What a run creates under its output folders, so that a run that fails early can remove exactly that.

    Snapshots the paths under each output folder before the run; ``remove_new()`` deletes what appeared since. An
    output folder that did not exist is removed with the parents the run created for it."""

    def __init__(self, roots: list[Path]):
        cwd = Path.cwd().resolve()
        self.before: dict[Path, set[Path] | None] = {}
        for root in roots:
            root = root.resolve()
            if root == cwd or root in cwd.parents:  # never sweep the working directory itself
                continue
            top = root
            while not top.parent.exists():  # the outermost folder this run will create
                top = top.parent
            self.before[top] = set(top.rglob("*")) if top.exists() else None

    def created(self) -> list[Path]:
        new = []
        for top, before in self.before.items():
            if before is None:
                new += [top] if top.exists() else []
            elif top.is_dir():
                new += [p for p in top.rglob("*") if p not in before]
        return new

    def remove_new(self) -> list[Path]:
        removed = []
        for path in sorted(self.created(), key=lambda p: len(p.parts)):  # parents first; children go with them
            if any(parent in removed for parent in path.parents) or not path.exists():
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
        return removed


class FineTuneCLI(LightningCLI):
    """The project's LightningCLI (see the module docstring); ``lightning_ft.run.main`` builds it."""

    def __init__(self, *args, **kwargs):
        # Imported for their subclass registration: jsonargparse resolves short class names among known subclasses.
        import lightning_ft.callbacks  # noqa: F401
        import lightning_ft.data  # noqa: F401
        import lightning_ft.methods  # noqa: F401

        self.resume_checkpoint: dict | None = None
        given = kwargs.get("args")
        given = sys.argv[1:] if given is None else given
        # Only the subcommand given is built (each one's parser describes the trainer, model and data anew: the
        # three others cost ~0.1-0.2 s of start-up); with none (e.g. --help) every one is.
        self._requested = next((a for a in given if isinstance(a, str) and a in LightningCLI.subcommands()), None)
        kwargs.setdefault("parser_class", FineTuneArgumentParser)
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        every = LightningCLI.subcommands()
        return {self._requested: every[self._requested]} if self._requested else every

    def _setup_parser_kwargs(self, parser_kwargs: dict) -> tuple[dict, dict]:
        # Per-subcommand parser kwargs are recognised by every subcommand's name, not only the one built.
        names = LightningCLI.subcommands().keys()
        main = {k: v for k, v in parser_kwargs.items() if k not in names}
        return main, {k: v for k, v in parser_kwargs.items() if k in names and k in self.subcommands()}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--checkpoint_every",
            type=int | None,
            default=None,
            help="Write a checkpoint every N training steps: sets every_n_train_steps of the ModelCheckpoint in "
            "trainer.callbacks (default: the config's).",
        )
        parser.add_argument(
            "--report",
            type=bool,
            default=True,
            help="At the end of fit, write report.html (figures, verdict, samples, cost) in the run folder: adds a "
            "RunReport to trainer.callbacks unless it lists one (default true).",
        )

    # ------------------------------------------------------------------------------------------------ resume
    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which parsed the checkpoint's hyperparameters over the command line: here the
        checkpoint is found (``last``), read and kept to be checked against the model the config describes."""
        sub = self.config.get("subcommand")
        if not sub or not self.config[sub].get("ckpt_path") or self.config[sub].ckpt_path in LIGHTNING_CKPT_NAMES:
            return
        path = self.config[sub].ckpt_path
        if path == "last":
            path = self._find_last(self.config[sub])
            self.config[sub].ckpt_path = str(path)
        self.resume_checkpoint = read_checkpoint(path, "ckpt_path")

    @staticmethod
    def _find_last(config) -> Path:
        root = config.trainer.get("default_root_dir")
        roots = [Path(root)] if root else [Path.cwd() / "lightning_logs", Path.cwd() / "checkpoints"]
        roots += _logger_dirs(config.trainer.get("logger"))
        path = find_last_checkpoint(roots)
        if path is None:
            raise FileNotFoundError(
                f"ckpt_path='last': no last.ckpt of an earlier run under {sorted({str(r) for r in roots})} "
                "(set trainer.default_root_dir to the run's folder, or give the checkpoint's path)"
            )
        print(f"lightning-ft: ckpt_path=last resumes {path} (the newest last.ckpt there)", flush=True)
        return path

    # -------------------------------------------------------------------------------------- checks, settings
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        data = config.get("data")
        # The data module's own check fires only after the model has loaded (minutes for a hub model): an
        # experiment run without its data config is told what to add at once.
        if data is not None and str(data.get("class_path")).endswith(".LimitedDataModule"):
            if (data.get("init_args") or {}).get("instance_dir") is None:
                raise ValueError(MISSING_INSTANCE_DIR)
        if self.subcommand == "fit":
            steps, epochs = config.trainer.get("max_steps"), config.trainer.get("max_epochs")
            if steps == 0 or (steps in (None, -1) and epochs == 0):
                key, value = ("trainer.max_steps", steps) if steps == 0 else ("trainer.max_epochs", epochs)
                raise ValueError(
                    f"{key}={value}: fit would train nothing and export the unchanged pretrained model as the run's "
                    "result; give a number of steps > 0"
                )
        every = config.get("checkpoint_every")
        if every is not None:
            self._set_checkpoint_every(config, every)

    @staticmethod
    def _set_checkpoint_every(config, every: int) -> None:
        if every <= 0:
            raise ValueError(f"checkpoint_every={every}: must be a number of steps > 0")
        callbacks = config.trainer.get("callbacks") or []
        checkpoints = [c for c in callbacks if str(getattr(c, "class_path", "")).endswith("ModelCheckpoint")]
        if not checkpoints:
            raise ValueError(f"checkpoint_every={every}: trainer.callbacks has no ModelCheckpoint to set it on")
        for callback in checkpoints:
            callback.init_args.every_n_train_steps = every

    def after_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        if self.resume_checkpoint is not None:
            checkpoint, path = self.resume_checkpoint, self.config[self.subcommand].ckpt_path
            check_checkpoint_fits(self.model, checkpoint, f"ckpt_path={path!r}")
            steps = self.trainer.max_steps
            if self.subcommand == "fit" and steps not in (None, -1) and checkpoint["global_step"] >= steps:
                raise ValueError(
                    f"trainer.max_steps={steps}, but ckpt_path={path!r} is at step {checkpoint['global_step']}: "
                    "nothing is left to train; give a larger trainer.max_steps"
                )
            changes = describe_changes(self.model, checkpoint, steps if self.subcommand == "fit" else None)
            print(
                f"lightning-ft: resuming {path} at step {checkpoint['global_step']}; "
                + (f"changed from the checkpoint's run: {'; '.join(changes)}" if changes else "same settings"),
                flush=True,
            )
            self.resume_checkpoint = None  # Lightning loads it again in fit: do not hold two copies
        if hasattr(self.datamodule, "check_inputs"):
            self.datamodule.check_inputs(self.model)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            raise _unwrap_union_error(error) from None

    def _instantiate_trainer(self, config: dict, callbacks: list):
        subcommand = self.config.get(self.subcommand) if self.subcommand else None
        if self.subcommand == "fit" and subcommand is not None:
            listed = config.get("callbacks") or []
            listed = [*(listed if isinstance(listed, list) else [listed]), *callbacks]
            if subcommand.get("report", True) and not any(isinstance(c, RunReport) for c in listed):
                callbacks = [*callbacks, RunReport()]
            # Last of the callbacks that are not checkpoints (Lightning runs those after all others): its
            # checkpoint at a signal holds the state after every other callback's work of that step, as
            # ModelCheckpoint's do.
            if not any(isinstance(c, GracefulStop) for c in listed):
                callbacks = [*callbacks, GracefulStop()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        bar = trainer.progress_bar_callback
        if type(bar) is RichProgressBar:  # Lightning's default bar: the same with the epoch count fixed
            trainer.callbacks[trainer.callbacks.index(bar)] = StepsProgressBar()
        self._check_precision(trainer)
        return trainer

    def _check_precision(self, trainer) -> None:
        """Warn when Lightning runs another precision than the config asks (e.g. ``16-mixed`` on a CPU runs as
        ``bf16-mixed``): config.yaml keeps what was asked, the run's run_cost.json records what ran."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        asked, ran = config.trainer.get("precision"), str(trainer.precision)
        if precision_name(asked) != ran:
            rank_zero_warn(
                f"lightning-ft: trainer.precision={asked} runs as {ran} on {type(trainer.accelerator).__name__} "
                "(Lightning's choice); config.yaml keeps the value asked, run_cost.json and the run report record "
                f"precision: {ran}"
            )

    # --------------------------------------------------------------------------------------------------- run
    def _output_roots(self) -> list[Path]:
        trainer = self.trainer
        roots = []
        for logger in trainer.loggers:
            root = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
            if root:
                roots.append(Path(root))
        root = Path(trainer.default_root_dir)
        if not trainer.loggers:  # config.yaml, checkpoints/ and export/ go straight into default_root_dir
            roots += [root / "config.yaml", root / "checkpoints", root / "export"]
        for callback in trainer.callbacks:
            if isinstance(callback, (ModelCheckpoint, DiffusersExport)) and callback.dirpath:
                roots.append(Path(callback.dirpath))
        return roots

    def _run_subcommand(self, subcommand: str) -> None:
        files = RunFiles(self._output_roots())
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            # Lightning's stop on a signal, a SystemExit without a code (exit status 0, as if the run had finished).
            stop = next((c.stopped for c in self.trainer.callbacks if isinstance(c, GracefulStop) and c.stopped), {})
            name, code = stop.get("signal", "SIGTERM"), 128 + int(stop.get("signum", signal.SIGTERM))
            where = (f"{stop['checkpoint']} holds step {stop['step']}; --ckpt_path last resumes it" if stop.get(
                "checkpoint") else "no checkpoint written by lightning-ft")  # fmt: skip
            if self.trainer.is_global_zero:
                print(f"lightning-ft: {subcommand} interrupted by {name}: {where}; exit status {code}", flush=True)
            raise SystemExit(code) from None  # 128 + n: what a shell reports for a process signal n killed
        except Exception:
            created = files.created()
            # A run that wrote checkpoints keeps everything: they resume it. Before that, its files are debris.
            if not any(p.suffix == ".ckpt" or (p.is_dir() and any(p.rglob("*.ckpt"))) for p in created):
                removed = files.remove_new() if self.trainer.global_rank == 0 else []
                if removed:
                    shown = ", ".join(str(p) for p in removed[:5])
                    print(f"lightning-ft: the run failed before its first checkpoint; removed what it wrote: {shown}")
            raise
