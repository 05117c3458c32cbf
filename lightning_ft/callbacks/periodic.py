"""The schedule the training monitors share: evaluate at the start, every N optimizer steps and at the end."""

from __future__ import annotations

import lightning as L


class PeriodicEvaluation(L.Callback):
    """Calls ``self.evaluate(trainer, pl_module)`` at the start of training (unless ``self.at_start`` is False),
    every ``self.every_n_steps`` optimizer steps (0 = never in between) and at the end. Subclasses set both
    attributes and implement ``evaluate``, which must skip a step it has already measured (resumes)."""

    every_n_steps: int = 0
    at_start: bool = True

    def evaluate(self, trainer: L.Trainer, pl_module) -> None:
        raise NotImplementedError

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_start:
            self.evaluate(trainer, pl_module)  # step 0 (or the resumed step, when the history lacks it)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module)
