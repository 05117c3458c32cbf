"""Noise processes: how training corrupts data and what the denoiser is trained to predict.

A ``NoiseProcess`` is chosen from the model's scheduler (``noise_process_for``) and is the only place that knows
the forward process: it draws training timesteps, adds noise, gives the prediction target, the signal-to-noise
ratio, the clean sample a prediction implies, and the timestep value the denoiser is given. Methods speak to it and
never to the scheduler.

- ``DDPMProcess``: the DDPM forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps over integer t in [0, T),
  with an epsilon, v or sample target, as diffusers' training scripts for Stable Diffusion 1.x/2.x and SDXL do: the
  noise is added by a ``DDPMScheduler`` built from the model's scheduler config (a pipeline folder ships its
  *sampling* scheduler, PNDM, DDIM, Euler..., some of which lack ``add_noise``'s siblings such as
  ``get_velocity``).
- Flow matching (SD3/3.5, Flux, Sana: x_t = (1 - sigma) x0 + sigma eps, target eps - x0) is the slot
  ``FLOW_MATCHING``: recognised, and refused until it is implemented, because ``DDPMScheduler.from_config`` would
  accept a flow scheduler's config without complaint and silently train a DDPM epsilon objective with default
  betas. A scheduler this project does not know is refused too, naming its class.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

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
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DDPM, FLOW_MATCHING = "ddpm", "flow_matching"


def process_kind(scheduler) -> str:
    """``ddpm`` or ``flow_matching`` for a diffusers scheduler; ``ValueError`` naming an unknown one."""
    name = type(scheduler).__name__
    config = dict(getattr(scheduler, "config", {}) or {})
    if (
        name.startswith(("FlowMatch", "FlowMap"))
        or config.get("use_flow_sigmas")
        or config.get("prediction_type") == "flow_prediction"
    ):
        return FLOW_MATCHING
    if name in DDPM_SCHEDULERS:
        return DDPM
    raise ValueError(
        f"unknown scheduler {name}; lightning-ft trains models whose scheduler is one of the DDPM family "
        f"({', '.join(sorted(DDPM_SCHEDULERS))})"
    )


def check_ddpm_scheduler(scheduler, key: str = "model.pretrained") -> None:
    """Raise ``NotImplementedError`` for a flow-matching scheduler (a ``FlowMatch*`` scheduler, or a DPM-Solver with
    flow sigmas or flow prediction, as Sana ships) and ``ValueError`` for an unknown one, naming ``key``."""
    try:
        kind = process_kind(scheduler)
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from None
    if kind == FLOW_MATCHING:
        raise NotImplementedError(
            f"{key}: the scheduler {type(scheduler).__name__} describes flow matching (SD3/3.5, Flux, Sana), whose "
            "objective (x_t = (1 - sigma) x0 + sigma eps, target eps - x0) lightning-ft does not train yet; training "
            "it with the DDPM objective would silently learn the wrong thing, so it is refused"
        )


class NoiseProcess:
    """The interface every noise process implements (see the module docstring). Timesteps ``t`` are what the
    process samples and indexes by; ``model_timesteps(t)`` is what the denoiser is given."""

    kind: str = ""

    @property
    def num_train_timesteps(self) -> int:
        raise NotImplementedError

    @property
    def prediction_type(self) -> str:
        raise NotImplementedError

    def sample_timesteps(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def stratified_timesteps(self, n: int, offset: float, device=None) -> torch.Tensor:
        """``n`` timesteps spread evenly over the process, shifted by ``offset`` in [0, 1) (evaluation losses)."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predicted_x0(self, prediction: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        raise NotImplementedError

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def fraction(self, t: torch.Tensor) -> torch.Tensor:
        """Where ``t`` lies between the data (0) and pure noise (1): rules such as "the noisier half" use it."""
        raise NotImplementedError


class DDPMProcess(NoiseProcess):
    """The DDPM forward process of a beta schedule, with an epsilon / v / sample target (module docstring).

    Args:
        scheduler: the model's scheduler (any of ``DDPM_SCHEDULERS``); its config builds a ``DDPMScheduler``.
        prediction_type: override the scheduler's prediction type (default None: the scheduler's).
    """

    kind = DDPM

    def __init__(self, scheduler, prediction_type: str | None = None):
        self.scheduler = DDPMScheduler.from_config(scheduler.config)
        if prediction_type is not None:
            self.scheduler.register_to_config(prediction_type=prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES} for a DDPM scheduler"
            )

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def sample_timesteps(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is not None:
            return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(device)
        return torch.randint(0, self.num_train_timesteps, (n,), device=device)

    def stratified_timesteps(self, n: int, offset: float, device=None) -> torch.Tensor:
        total = self.num_train_timesteps
        return ((torch.arange(n) + offset) * total / n).long().clamp(max=total - 1).to(device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0

    def _signal_sigma(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.scheduler.alphas_cumprod.to(t.device)[t].float().view(-1, *([1] * (ndim - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    def predicted_x0(self, prediction: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 a model output implies, for the prediction type (epsilon / v_prediction / sample)."""
        kind = self.prediction_type
        if kind == "sample":
            return prediction
        signal, sigma = self._signal_sigma(t, noisy.ndim)
        if kind == "epsilon":
            return (noisy - sigma * prediction) / signal
        return signal * noisy - sigma * prediction

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return compute_snr(self.scheduler, t)

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weights of the prediction type's loss (Hang et al. 2023, as diffusers' scripts)."""
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        if self.prediction_type == "sample":  # the paper's weight for an x0 loss is min(SNR, gamma) itself
            return clipped
        return clipped / snr.clamp(min=1e-8)

    def fraction(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_train_timesteps


def noise_process_for(scheduler, key: str = "model.pretrained", prediction_type: str | None = None) -> NoiseProcess:
    """The noise process a model's scheduler describes; flow matching and unknown schedulers are refused, naming
    ``key`` and the scheduler's class (see the module docstring)."""
    check_ddpm_scheduler(scheduler, key)
    return DDPMProcess(scheduler, prediction_type)
