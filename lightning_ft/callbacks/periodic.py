"""The schedule the training monitors share: evaluate at the start, every N optimizer steps and at the end."""

from __future__ import annotations

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_warn


class PeriodicEvaluation(L.Callback):
    """Calls ``self.evaluate(trainer, pl_module)`` at the start of training (unless ``self.at_start`` is False),
    every ``self.every_n_steps`` optimizer steps (0 = never in between) and at the end. Subclasses set both
    attributes and implement ``evaluate``, which must skip a step it has already measured (resumes).

    A monitor that samples with prompts or labels only (``reads_controls`` False) cannot ask a model with a
    ControlNet, whose samples need control images, nor an editing model, whose samples need source images:
    ``off_for`` switches it off for that fit, with a warning."""

    every_n_steps: int = 0
    at_start: bool = True
    #: True for a monitor that samples with control images (a ControlNet's); the others are off for such a model.
    reads_controls: bool = False
    off: bool = False

    def off_for(self, pl_module) -> bool:
        """Switch this monitor off (and say so) when ``pl_module`` has a ControlNet it cannot sample; True if off."""
        if not self.reads_controls and getattr(pl_module, "controlnet", None) is not None:
            if not self.off:
                rank_zero_warn(f"lightning-ft: {type(self).__name__} is off: the model has a ControlNet, whose samples "
                               "need control images (ControlAdherenceMonitor measures a ControlNet)")  # fmt: skip
            self.off = True
        family = getattr(pl_module, "family", None)
        if not self.reads_controls and getattr(family, "needs_source", False):
            if not self.off:
                rank_zero_warn(f"lightning-ft: {type(self).__name__} is off: the {family.name} family is an editing "
                               "model, whose samples need source images")  # fmt: skip
            self.off = True
        return self.off

    def evaluate(self, trainer: L.Trainer, pl_module) -> None:
        raise NotImplementedError

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_start and not self.off_for(pl_module):
            self.evaluate(trainer, pl_module)  # step 0 (or the resumed step, when the history lacks it)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and not self.off_for(pl_module):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not self.off_for(pl_module):
            self.evaluate(trainer, pl_module)
