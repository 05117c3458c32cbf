"""Optimisation for ``DiffusionBase``: parameter groups, AdamW, the LR schedule, and the config's settings put back
over a resumed checkpoint's."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler as get_lr_scheduler


class OptimizationMixin:
    """Needs ``hparams``, ``parameters`` and the trainer of a LightningModule."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; override to give inserted modules their own learning rate."""
        return [{"params": self.trainable_parameters()}]

    def configure_optimizers(self):
        h = self.hparams
        groups = [g for g in self.param_groups() if g["params"]]
        if not groups:
            raise ValueError(f"nothing to train: model.trainable={h.trainable!r} left no parameter with requires_grad")
        optimizer = torch.optim.AdamW(groups, **self._adamw_settings())
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        total = int(total) if total and total != float("inf") else 1
        schedule = get_lr_scheduler(
            h.lr_scheduler, optimizer, num_warmup_steps=h.warmup_steps, num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _adamw_settings(self) -> dict:
        h = self.hparams
        return {"lr": h.lr, "betas": tuple(h.betas), "weight_decay": h.weight_decay, "eps": h.adam_eps}

    def _apply_optimizer_settings(self) -> None:
        """After a resume, put the config's optimizer settings back over the checkpoint's.

        Lightning restores the optimizer's and the LR schedule's state, and with them the learning rate (the
        schedule's ``base_lrs``) and the AdamW settings the checkpoint trained with; the command line must win. The
        schedule's shape comes from this run already (its lambda is rebuilt from this run's ``max_steps``), so the
        learning rate is the new base times the schedule's factor at the resumed step. Unchanged settings give back
        exactly the restored values, which keeps an exact resume exact."""
        if self._trainer is None or not self.trainer.optimizers:
            return
        settings = self._adamw_settings()
        optimizer = self.trainer.optimizers[0]
        wanted = [g.get("lr", settings["lr"]) for g in self.param_groups() if g["params"]]
        for group in optimizer.param_groups:
            group.update({k: v for k, v in settings.items() if k != "lr"})
        for config in self.trainer.lr_scheduler_configs:
            schedule = config.scheduler
            factors = getattr(schedule, "lr_lambdas", None)
            if schedule.optimizer is not optimizer or len(wanted) != len(optimizer.param_groups) or factors is None:
                continue
            schedule.base_lrs = list(wanted)
            for group, base, factor in zip(optimizer.param_groups, wanted, factors):
                group["initial_lr"] = base
                lr = base * factor(schedule.last_epoch)
                if group["lr"] != lr:
                    group["lr"] = lr
            schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
