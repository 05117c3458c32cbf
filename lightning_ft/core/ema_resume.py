"""EMA and checkpoints for ``DiffusionBase``: the EMA of the trainable weights (used to sample and export), what a
checkpoint keeps (trainable weights, EMA, random state), and an exact resume on top of ``pretrained``."""

from __future__ import annotations

import contextlib

from diffusers.training_utils import EMAModel

from lightning_ft.core.resume import check_checkpoint_fits, method_name
from lightning_ft.core.rng import rng_states, set_rng_states


class EMAResumeMixin:
    """Needs ``hparams``, ``trainable_parameters``, ``model_identity`` and the LightningModule hooks."""

    def on_fit_start(self) -> None:
        if self.hparams.ema_decay is not None and self.ema is None:
            self.ema = EMAModel(self.trainable_parameters(), decay=self.hparams.ema_decay)
        if self.ema is not None:
            self.ema.to(self.ema_home())
        restored = getattr(self, "_restored_ema_step", None)
        self._ema_global_step = restored if restored is not None else self.trainer.global_step

    def on_train_start(self) -> None:
        # After Lightning restored the optimizer and schedule (in fit, before this hook): the config's lr wins.
        if getattr(self, "_resumed", False):
            self._apply_optimizer_settings()
        # A checkpoint is written in on_train_batch_end before this module's own on_train_batch_end applies that
        # step's EMA update: a resumed run applies it now, so the EMA continues exactly as in an unbroken run.
        if self.ema is not None and self._ema_global_step < self.trainer.global_step:
            self.ema_step()
            self._ema_global_step = self.trainer.global_step
        # Module hooks run after the callbacks' on_train_start (which may sample): the restored stream starts here.
        if getattr(self, "_pending_rng_states", None) is not None:
            set_rng_states(self._pending_rng_states)
            self._pending_rng_states = None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Once per optimizer step, not per micro-batch: with gradient accumulation the weights change only every
        # `accumulate_grad_batches` batches (diffusers steps its EMA under `accelerator.sync_gradients`).
        if self.ema is not None and self.trainer.global_step > self._ema_global_step:
            self._ema_global_step = self.trainer.global_step
            self.ema_step()

    def ema_home(self):
        """Where the EMA weights live between steps: the CPU with ``ema_offload`` (a copy of every trainable weight
        held off the accelerator, as diffusers' ``--offload_ema``), else the module's device."""
        return "cpu" if self.hparams.ema_offload else self.device

    def ema_step(self) -> None:
        """One EMA update; an offloaded EMA visits the accelerator for it and goes back."""
        if self.hparams.ema_offload:
            self.ema.to(self.device, non_blocking=True)
        self.ema.step(self.trainable_parameters())
        if self.hparams.ema_offload:
            self.ema.to("cpu", non_blocking=True)

    @contextlib.contextmanager
    def sampling_weights(self):
        """Within this block the module holds the weights used to sample and export (EMA if enabled), in eval."""
        was_training = self.training
        self.eval()
        if self.ema is not None:
            params = self.trainable_parameters()
            self.ema.store(params)
            self.ema.copy_to(params)
        try:
            yield
        finally:
            if self.ema is not None:
                self.ema.restore(params)
            self.train(was_training)

    # --------------------------------------------------------------------------------------------- checkpoints
    def trainable_state_keys(self) -> set[str]:
        """State-dict keys a checkpoint keeps: trainable parameters (frozen weights come from ``pretrained``)."""
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lightning_ft"] = {
            "method": method_name(type(self)),  # a resume into another method is refused (core/resume.py)
            "max_steps": self.trainer.max_steps if self._trainer is not None else None,
            "model_identity": self.model_identity(),
            "trainable_keys": sorted(keep),
            "ema_step": self._ema_global_step,  # the last step whose EMA update is in checkpoint["ema"]
        }
        # Lightning keeps no random state; noise, timesteps and condition dropout draw from the global generators, so
        # a resumed run needs them to continue exactly (restored in on_train_start, after every setup hook).
        checkpoint["rng_states"] = rng_states()
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The CLI has checked this before anything was written; a run started from Python is checked here.
        check_checkpoint_fits(self, checkpoint, "checkpoint")
        self._resumed = True
        self._pending_rng_states = checkpoint.get("rng_states")
        self._restored_ema_step = checkpoint.get("lightning_ft", {}).get("ema_step")
        if "ema" in checkpoint and self.hparams.ema_decay is not None:
            self.ema = EMAModel(self.trainable_parameters(), decay=self.hparams.ema_decay)
            self.ema.load_state_dict(checkpoint["ema"])
            self.ema.decay = self.hparams.ema_decay  # the state dict carries the old decay; the config wins
            self.ema.to(self.ema_home())  # strategies that restore after on_fit_start (FSDP) need the move here
