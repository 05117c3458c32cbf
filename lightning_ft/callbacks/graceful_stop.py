"""Stop a fit on SIGTERM or SIGINT at the next step boundary, with a checkpoint that resumes it exactly.

Clusters preempt with SIGTERM. Lightning's own handling (``trainer/connectors/signal_connector.py``): its SIGTERM
handler sets ``trainer.received_sigterm`` and forwards the signal to the processes its launcher started (with
SLURM auto-requeue it also takes SIGUSR1, see docs/usage.md, SLURM); the loops then raise ``SIGTERMException`` at the
end of the current step. Nothing is saved, and the exception is a ``SystemExit`` without a code: the process exits
0. SIGINT raises ``KeyboardInterrupt`` wherever the main thread is, mid-step.

``GracefulStop`` builds on that mechanism (the CLI adds it to every ``fit``):

- During training its handler takes SIGTERM and SIGINT first and only records the signal. Lightning's handler is
  kept and called later, at the step boundary: called at once, it could stop the run between this callback's check
  and the end of the step, without a checkpoint.
- At the end of each optimizer step (``on_train_batch_end``, where ``ModelCheckpoint`` writes the checkpoints that
  resume bitwise) the ranks agree, by an all-reduce of the signal number, whether any of them got a signal, so all
  stop at the same step whichever rank received it. Then every rank takes part in writing ``last.ckpt`` into the
  ``ModelCheckpoint``'s folder (the file ``--ckpt_path last`` finds) and calls Lightning's handler: its loops finish
  the step's logging and raise ``SIGTERMException`` (a validation due at that step stops after its first batch, as
  on any SIGTERM in Lightning), so ``on_fit_end`` (the export) does not run, and ``on_exception`` does
  (``RunReport`` writes the report with the run marked interrupted). At an epoch's last batch the checkpoint waits
  for the end of the epoch (its validation included): one written at that batch resumes one epoch too far.
- ``lightning_ft.cli`` turns the exception into exit status 128 + the signal's number (143 for SIGTERM, 130 for
  SIGINT), as a shell reports a process the signal killed.

A second SIGINT acts at once (Lightning's ``KeyboardInterrupt`` path: no checkpoint). A signal at the last step
does not stop the run: its training is complete, so it finishes (monitors, export, report). Signals before training
starts (class images, model loading) keep their usual effect.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: The file ``--ckpt_path last`` looks for (``lightning_ft.cli.find_last_checkpoint``).
LAST_NAME = "last.ckpt"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _parse_signals(names) -> tuple[signal.Signals, ...]:
    parsed = []
    for name in names:
        key = str(name).upper()
        key = key if key.startswith("SIG") else f"SIG{key}"
        if key not in signal.Signals.__members__:
            raise ValueError(f"GracefulStop.signals: {name!r} is not a signal name (e.g. SIGTERM, SIGINT, SIGUSR2)")
        if key in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"GracefulStop.signals: {name!r} cannot be caught by any process")
        parsed.append(signal.Signals[key])
    if not parsed:
        raise ValueError("GracefulStop.signals is empty: give at least one signal (default SIGTERM, SIGINT)")
    return tuple(parsed)


class GracefulStop(L.Callback):
    """On a signal during training: ``last.ckpt`` at the next step boundary, then stop (see the module docstring).

    Args:
        signals: the signals that stop the fit this way (default SIGTERM and SIGINT; e.g. add SIGUSR2 for a
            scheduler's early warning, ``sbatch --signal=USR2@120``). Another signal that already has a handler when
            training starts (Lightning's SIGUSR1 under SLURM auto-requeue) is left to it, with a warning.

    After the stop, ``stopped`` holds ``{"signal": "SIGTERM", "signum": 15, "step": 15, "checkpoint": path}`` on
    every rank.
    """

    def __init__(self, signals: list[str] = ["SIGTERM", "SIGINT"]):
        self.signals = _parse_signals(signals)
        self.received: int | None = None  # this rank's first signal, set by the handler
        self.stopped: dict | None = None
        self._previous: dict[int, object] = {}
        self._seen_step = 0
        self._checkpoint: str | None = None
        self._checkpoint_callback: ModelCheckpoint | None = None
        self._prefix = ""
        self._at_epoch_end = 0  # the agreed signal, when it came at an epoch's last batch: stop at the epoch's end

    # ----------------------------------------------------------------------------------------------- handlers
    def _on_signal(self, signum: int, frame) -> None:
        # Runs between two bytecodes of the main thread: record, and say so with a raw write (print could re-enter
        # a write to stdout that the main thread is in the middle of); no collective, no checkpoint here.
        if self.received is not None and signum == self.received == signal.SIGINT:
            previous = self._previous.get(signum)
            self._restore()
            if callable(previous):
                previous(signum, frame)  # the second Ctrl+C: Python's KeyboardInterrupt, now
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            again = " (Ctrl+C again: stop now, without one)" if signum == signal.SIGINT else ""
            name = signal_name(signum)
            text = f"\nlightning-ft: {self._prefix}{name}: checkpoint at the end of this step, then stop{again}\n"
            with contextlib.suppress(OSError):  # a closed stderr must not turn the signal into an error
                os.write(2, text.encode())

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("lightning-ft: GracefulStop: fit runs outside the main thread, where Python delivers no "
                           "signal; SIGTERM/SIGINT will not save a checkpoint before stopping")  # fmt: skip
            return
        for signum in self.signals:
            current = signal.getsignal(signum)
            if current is signal.SIG_IGN:  # e.g. SIGINT of a job started in the background: it stays ignored
                continue
            if signum not in (signal.SIGTERM, signal.SIGINT) and callable(current):
                # Only SIGTERM's handler (Lightning's) is called at the step boundary: another one would never run.
                rank_zero_warn(f"lightning-ft: GracefulStop leaves {signal_name(signum)} to the handler set before it "
                               "(e.g. Lightning's SLURM auto-requeue on SIGUSR1)")  # fmt: skip
                continue
            self._previous[signum] = current
            signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:  # only ours: never undo a handler set after it
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # Lightning registers its SIGTERM handler just before the training stage starts (Trainer._run): installed
        # here, this callback's handler comes in front of it, and keeps it to call at the step boundary.
        self.received, self.stopped, self._at_epoch_end = None, None, 0
        # A SIGTERM that came after Lightning registered its handler and before this one (the monitors' evaluation at
        # the start can be long) set Lightning's flag only: it stops at the first step boundary, with a checkpoint.
        if trainer.received_sigterm:
            self.received = signal.SIGTERM
        self._prefix = f"[rank {trainer.global_rank}] " if trainer.world_size > 1 else ""
        self._seen_step = trainer.global_step
        self._checkpoint_callback = self._pick_checkpoint_callback(trainer)
        dirpath = self._checkpoint_callback.dirpath if self._checkpoint_callback is not None else None
        if not dirpath:  # no ModelCheckpoint: Lightning's default folder, under the run's (where `last` looks)
            dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        self._checkpoint = os.path.join(str(dirpath), LAST_NAME)
        self._install()

    @staticmethod
    def _pick_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
        """The ModelCheckpoint that keeps ``last.ckpt`` (``save_last``), else the first one."""
        checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        return next((c for c in checkpoints if c.save_last), checkpoints[0] if checkpoints else None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stopped is not None or self._at_epoch_end:
            return
        if trainer.global_step == self._seen_step:
            return  # a micro-batch of gradient accumulation: the weights have not moved, not a step boundary
        self._seen_step = trainer.global_step
        signum = self._agree(trainer)
        if not signum:
            return
        if self._training_is_done(trainer):
            rank_zero_info(f"lightning-ft: {signal_name(signum)} at the last training step: the run is complete and "
                           "finishes (monitors, export, report)")  # fmt: skip
            return
        if trainer.is_last_batch:
            # A checkpoint from the end of an epoch's last batch resumes one epoch too far (Lightning's restart
            # counts that epoch twice: a run bounded by max_epochs would train one less, and the sampler would be
            # seeded with the wrong epoch); one from the end of the epoch resumes at the next. Same decision on
            # every rank: they all agreed on signum and are at the same batch.
            self._at_epoch_end = signum
            return
        self._stop(trainer, signum)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._at_epoch_end and self.stopped is None:
            self._stop(trainer, self._at_epoch_end)

    def _stop(self, trainer: L.Trainer, signum: int) -> None:
        name = signal_name(signum)
        self._save_last(trainer)
        self.stopped = {"signal": name, "signum": signum, "step": trainer.global_step, "checkpoint": self._checkpoint}
        rank_zero_info(f"lightning-ft: {name} received: saved {self._checkpoint} at step {trainer.global_step}; "
                       "stopping (the run is not finished: no export); --ckpt_path last resumes it")  # fmt: skip
        self._stop_through_lightning(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # Training is over: from here a signal has its usual effect again (Lightning's handler, Python's Ctrl+C).
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # After an exception: Lightning's teardown has restored the handlers from before the fit; this is a
        # no-op then, and kept for a trainer whose teardown does not.
        self._restore()

    # ------------------------------------------------------------------------------------------------ helpers
    def _agree(self, trainer: L.Trainer) -> int:
        """The largest signal number any rank received (0: none), the same on every rank."""
        mine = int(self.received or 0)
        if trainer.world_size == 1:
            return mine
        # Every rank reaches this point at the same step (it runs at every step boundary), so the collective pairs.
        flag = torch.tensor([mine], dtype=torch.int64, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(flag, reduce_op="max").item())

    @staticmethod
    def _training_is_done(trainer: L.Trainer) -> bool:
        if trainer.should_stop:  # e.g. early stopping: the fit ends at this step anyway, as a finished run
            return True
        if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
            return True
        epochs = trainer.max_epochs  # None or -1: bounded by steps only
        return bool(trainer.is_last_batch and epochs is not None and 0 <= epochs <= trainer.current_epoch + 1)

    def _save_last(self, trainer: L.Trainer) -> None:
        callback = self._checkpoint_callback
        if callback is not None:
            # As ModelCheckpoint does before its own save of last.ckpt: the path is part of the saved state, and a
            # save of last.ckpt by that callback later in this step or after the resume overwrites this file instead
            # of writing last-v1.ckpt beside it (which --ckpt_path last would not find).
            callback.last_model_path = self._checkpoint
        trainer.save_checkpoint(self._checkpoint)  # collective: each rank writes its part (rank 0 all, under DDP)

    def _stop_through_lightning(self, trainer: L.Trainer) -> None:
        handler = self._previous.get(signal.SIGTERM)
        if callable(handler):
            handler(signal.SIGTERM, None)  # Lightning's: sets trainer.received_sigterm, forwards to its launcher's
        if not trainer.received_sigterm:  # no Lightning handler in front of ours: stop as its loops would
            raise SIGTERMException
