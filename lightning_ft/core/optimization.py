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
        optimizer = torch.optim.AdamW(groups, **self._adamw_settings(), **self._adamw_implementation(groups))
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        total = int(total) if total and total != float("inf") else 1
        schedule = get_lr_scheduler(
            h.lr_scheduler, optimizer, num_warmup_steps=h.warmup_steps, num_training_steps=total
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _adamw_settings(self) -> dict:
        h = self.hparams
        return {"lr": h.lr, "betas": tuple(h.betas), "weight_decay": h.weight_decay, "eps": h.adam_eps}

    def _adamw_implementation(self, groups: list[dict]) -> dict:
        """``fused=True`` when ``fused_adamw`` is on, or auto and torch has the fused kernel for every parameter;
        else {} (torch's own choice: foreach on CUDA, a per-parameter loop on the CPU). The fused kernel updates
        every tensor in one pass; on the CPU it is several times faster than the loop (docs/performance.md)."""
        wanted = self.hparams.get("fused_adamw")
        if wanted is False:
            return {}
        params = [p for g in groups for p in g["params"]]
        devices = set(_fused_devices())
        supported = all(p.is_floating_point() and p.device.type in devices for p in params)
        if wanted and not supported:
            kinds = sorted({f"{p.device.type}/{p.dtype}" for p in params})
            raise ValueError(f"model.fused_adamw=true: torch has no fused AdamW for parameters on {kinds}")
        return {"fused": True} if supported else {}

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


def _fused_devices() -> list[str]:
    """The device types torch's fused AdamW supports (a private helper of torch's; CPU and CUDA if it moves)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return _get_fused_kernels_supported_devices()
    except ImportError:
        return ["cpu", "cuda"]
