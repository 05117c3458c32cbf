"""Which noise process a model's scheduler describes, so that training never adds the wrong kind of noise.

Training adds noise with a ``DDPMScheduler`` built from the model's scheduler config, as diffusers' training scripts
do for Stable Diffusion 1.x/2.x and SDXL. ``DDPMScheduler.from_config`` accepts any scheduler's config without
complaint, so a flow-matching model (SD3/3.5, Flux, Sana) would silently be trained on a DDPM epsilon objective
with default linear betas. Until the flow-matching process is implemented, such a model is refused here, naming its
scheduler; so is a scheduler this project does not know.
"""

from __future__ import annotations

# diffusers schedulers over the DDPM forward process (a beta schedule): their configs build the training scheduler.
DDPM_SCHEDULERS = frozenset(
    {
        "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "LMSDiscreteScheduler",
        "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler",
        "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
        "SASolverScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
    }
)  # fmt: skip


def check_ddpm_scheduler(scheduler, key: str = "model.pretrained") -> None:
    """Raise ``NotImplementedError`` when ``scheduler`` describes flow matching (a ``FlowMatch*`` scheduler, or a
    DPM-Solver with flow sigmas or flow prediction, as Sana ships), and ``ValueError`` when it is a scheduler this
    project does not know; return for the DDPM family."""
    name = type(scheduler).__name__
    config = dict(getattr(scheduler, "config", {}) or {})
    flow = (
        name.startswith(("FlowMatch", "FlowMap"))
        or config.get("use_flow_sigmas")
        or config.get("prediction_type") == "flow_prediction"
    )
    if flow:
        raise NotImplementedError(
            f"{key}: the scheduler {name} describes flow matching (SD3/3.5, Flux, Sana), whose objective (x_t = "
            "(1 - sigma) x0 + sigma eps, target eps - x0) lightning-ft does not train yet; training it with the DDPM "
            "objective would silently learn the wrong thing, so it is refused"
        )
    if name not in DDPM_SCHEDULERS:
        raise ValueError(
            f"{key}: unknown scheduler {name}; lightning-ft trains models whose scheduler is one of the DDPM family "
            f"({', '.join(sorted(DDPM_SCHEDULERS))})"
        )
