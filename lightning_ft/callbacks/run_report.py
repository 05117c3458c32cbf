"""Write the run report at the end of a fit and measure what the fit cost.

The CLI adds a ``RunReport`` to every ``fit`` (``--report false`` leaves it out; a config that lists one keeps its
own settings). At the end of the fit, on rank 0, after the other callbacks (the monitors' last evaluation, the last
sample grid, the export), it writes ``run_cost.json`` and the report (``report.html`` and ``report/*.png``, see
``lightning_ft.report``) into the run folder, and sends the figures to W&B when a ``WandbLogger`` is among the
loggers. A report that cannot be drawn is a warning, not a failed run: everything else is written by then, and
``python -m lightning_ft.report RUN_DIR`` draws it again.

A fit stopped by a signal at a step boundary (``GracefulStop``, or Lightning's SIGTERM handling: the loops raise
``SIGTERMException``) gets its report too, with ``run_cost.json`` marked ``"status": "interrupted"``, the signal and
the checkpoint that resumes it; the page says so at the top. ``run_cost.json`` also records ``precision``: what
Lightning ran (``trainer.precision``), which can differ from the config's (``16-mixed`` runs as ``bf16-mixed`` on a
CPU).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_ft.callbacks.graceful_stop import GracefulStop
from lightning_ft.report.cost import COST_FILE, CostMeter, write_cost


class RunReport(L.Callback):
    """Cost meter and report writer of a fit.

    Args:
        max_grids: at most this many sample grids in the report, evenly spaced, the last always (default 4).
        wandb: send the report's figures (and the cost) to a ``WandbLogger`` when there is one (default True).
        verbose: print where the report was written (default True).
    """

    def __init__(self, max_grids: int = 4, wandb: bool = True, verbose: bool = True):
        if max_grids < 1:
            raise ValueError(f"RunReport: max_grids={max_grids}; at least 1 grid")
        self.max_grids, self.wandb, self.verbose = max_grids, wandb, verbose
        self.meter = CostMeter()
        self.folder: Path | None = None
        self.written: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        # trainer.log_dir broadcasts: every rank reads it, here, once.
        self.folder = Path(trainer.log_dir or trainer.default_root_dir)
        self.meter.start(trainer.global_step, pl_module.device if pl_module.device.type == "cuda" else None)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.meter.start_step = trainer.global_step  # a resumed fit has its step restored by now
        if pl_module.device.type == "cuda" and self.meter.cuda_device is None:  # moved to the GPU after setup
            self.meter.start(trainer.global_step, pl_module.device)

    def _cost(self, trainer: L.Trainer, status: str = "finished") -> dict:
        return {**self.meter.stop(trainer.global_step, status), "precision": str(trainer.precision)}

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if self.folder is None or self.meter.t0 is None or not trainer.is_global_zero:
            return
        # A SIGTERMException is an orderly stop at a step boundary: the run's files are consistent, so it gets its
        # report. A KeyboardInterrupt (a second Ctrl+C) stops mid-step: the cost only, at once.
        stopped = isinstance(exception, SIGTERMException)
        record = self._cost(trainer, "interrupted" if stopped or isinstance(exception, KeyboardInterrupt) else "failed")
        if stopped:  # GracefulStop's record, else Lightning's own SIGTERM stop (before training: no checkpoint)
            stop = next((c.stopped for c in trainer.callbacks if isinstance(c, GracefulStop) and c.stopped), {})
            record.update(signal=stop.get("signal", "SIGTERM"), checkpoint=stop.get("checkpoint"))
        elif isinstance(exception, KeyboardInterrupt):
            record.update(signal="SIGINT", checkpoint=None)
        write_cost(self.folder / COST_FILE, record)
        if stopped:
            self._write_report(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.folder is None or not trainer.is_global_zero:
            return
        write_cost(self.folder / COST_FILE, self._cost(trainer))
        self._write_report(trainer)

    def _write_report(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()  # the CSV logger keeps the last rows in memory until it is finalized, after this hook
        try:
            from lightning_ft.report.run_folder import read_run
            from lightning_ft.report.run_report import build_run_report

            built = build_run_report(read_run(self.folder), self.max_grids)
            self.written = built.write(self.folder)
        except Exception as error:  # the run's own files are all written: a report bug must not fail it
            rank_zero_warn(
                f"lightning-ft: the run report could not be written ({type(error).__name__}: {error}); the run's "
                f"files are complete; draw it again with: python -m lightning_ft.report {self.folder}"
            )
            return
        if self.verbose:
            rank_zero_info(f"lightning-ft: run report written to {self.written}")
        if self.wandb:
            log_to_wandb(trainer, built)


def log_to_wandb(trainer: L.Trainer, built) -> list[str]:
    """The report's figures as ``wandb.Image`` under ``report/<name>`` at the last step, and the cost and verdict in
    the run summary, for every ``WandbLogger`` of the trainer; returns the keys logged."""
    from lightning.pytorch.loggers import WandbLogger

    loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
    if not loggers:
        return []
    import io

    import wandb
    from PIL import Image

    keys = [f"report/{name}" for name in built.figures]
    summary = built.summary
    extra = {f"report/{k}": summary[k] for k in ("verdict", "recommended_step", "wall_seconds", "steps_per_second",
                                                 "peak_memory_bytes") if summary.get(k) is not None}  # fmt: skip
    for logger in loggers:
        images = {f"report/{name}": wandb.Image(Image.open(io.BytesIO(png)), caption=name)
                  for name, png in built.figures.items()}  # fmt: skip
        logger.log_metrics(images, step=trainer.global_step)
        logger.experiment.summary.update(extra)
    return keys
