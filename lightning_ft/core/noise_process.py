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
- ``FlowMatchingProcess``: rectified flow (SD3/3.5, Flux, Sana), as diffusers' SD3 and Flux training scripts define
  it: x_t = (1 - sigma) x0 + sigma eps, target eps - x0, sigma drawn uniform, logit-normal or "mode" and shifted as
  the family's scheduler shifts it (fixed ``shift``, or resolution-dependent for ``use_dynamic_shifting``), loss
  weighting none, sigma_sqrt or cosmap, and the denoiser given 1000 sigma. ``DDPMScheduler.from_config`` would
  accept a flow scheduler's config without complaint and silently train a DDPM epsilon objective with default betas:
  the kind of process is read from the scheduler first. A scheduler this project does not know is refused, naming
  its class.

Timesteps are integers t in [0, T) for both, increasing with the noise: a method's rule written in t (Diff-Tuning's
p(t) ~ (t + 1)^a, SDFT's t >= 0.5 T) carries over to flow matching through ``fraction(t)`` = (t + 1) / T, the
position along the *unshifted* schedule u, whose shifted sigma is the noise level (the mapping is documented in
docs/methods.md). diffusers' tables run the other way (index 0 = sigma 1); ``FlowMatchingProcess`` maps its densities
exactly onto theirs.
"""

from __future__ import annotations

import copy
import math

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr

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
#: How training timesteps are drawn: ``uniform`` (both processes), ``logit_normal`` and ``mode`` (flow matching, the
#: SD3 paper's densities as diffusers' ``compute_density_for_timestep_sampling`` draws them).
TIMESTEP_DENSITIES = ("uniform", "logit_normal", "mode")
#: Flow-matching loss weightings (diffusers' ``compute_loss_weighting_for_sd3``).
FLOW_LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


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
    """Raise ``ValueError`` naming ``key`` for a scheduler of no known process, and ``NotImplementedError`` for a
    flow-matching one where only the DDPM process can be used (e.g. by code written for DDPM models)."""
    try:
        kind = process_kind(scheduler)
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from None
    if kind == FLOW_MATCHING:
        raise NotImplementedError(
            f"{key}: the scheduler {type(scheduler).__name__} describes flow matching (x_t = (1 - sigma) x0 + sigma "
            "eps, target eps - x0), not the DDPM process"
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

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """The process's own per-sample loss weights (1 for DDPM; the flow weighting scheme)."""
        return torch.ones(len(t), device=t.device)

    def model_timesteps(self, t: torch.Tensor, sample: torch.Tensor | None = None) -> torch.Tensor:
        """The timestep value the denoiser is given for ``t`` (``sample``: the noisy input, for resolution-dependent
        schedules)."""
        return t

    def fraction(self, t: torch.Tensor) -> torch.Tensor:
        """Where ``t`` lies between the data (0) and pure noise (1): rules such as "the noisier half" use it."""
        raise NotImplementedError


class DDPMProcess(NoiseProcess):
    """The DDPM forward process of a beta schedule, with an epsilon / v / sample target (module docstring).

    Args:
        scheduler: the model's scheduler (any of ``DDPM_SCHEDULERS``); its config builds a ``DDPMScheduler``, and
            it is kept as ``model_scheduler``: the sampler its folder ships (e.g. SD1.5's PNDM, SDXL's Euler), which
            sampling and export keep, as diffusers' DreamBooth scripts keep the base folder's scheduler.
        prediction_type: override the scheduler's prediction type (default None: the scheduler's).
    """

    kind = DDPM

    def __init__(self, scheduler, prediction_type: str | None = None):
        self.scheduler = DDPMScheduler.from_config(scheduler.config)
        self.model_scheduler = type(scheduler).from_config(scheduler.config)
        if prediction_type is not None:
            self.scheduler.register_to_config(prediction_type=prediction_type)
            self.model_scheduler.register_to_config(prediction_type=prediction_type)
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


class FlowMatchingProcess(NoiseProcess):
    """Rectified flow as diffusers' SD3 / Flux training scripts define it (module docstring).

    Args:
        scheduler: the model's flow scheduler (``FlowMatchEulerDiscreteScheduler`` config: ``num_train_timesteps``,
            ``shift``, ``use_dynamic_shifting`` with ``base_shift``/``max_shift``/``base_image_seq_len``/
            ``max_image_seq_len``); kept, as the family's own scheduler, for sampling and export.
        density: ``uniform`` | ``logit_normal`` | ``mode`` (default ``uniform``).
        logit_mean, logit_std, mode_scale: the densities' settings (defaults 0.0, 1.0, 1.29: diffusers' defaults).
        loss_weighting: ``none`` | ``sigma_sqrt`` | ``cosmap`` (default ``none``).
        shift: the sigma shift; None (default) = the scheduler's: its fixed ``shift``, or with
            ``use_dynamic_shifting`` the resolution-dependent shift its pipelines sample with (exp(mu), mu linear in
            the number of image tokens). diffusers' Flux training script trains such models unshifted; give
            ``shift=1.0`` for that.
        tokens_per_latent: how many latent pixels make one image token of the transformer (4 for 2x2 patches), for
            the resolution-dependent shift (default 4).
        model_scheduler: the scheduler the model ships for sampling when it is not ``scheduler`` itself (Sana's
            DPM-Solver over flow sigmas); sampling and export use it (default None: ``scheduler``).
        precondition_outputs: score the implied x0 instead of the velocity, as diffusers' SD3 scripts do with
            ``--precondition_outputs 1``: the loss times sigma^2 (default False).
        shift_rule: the resolution-dependent shift exponent mu of a latent shape, when ``shift`` is None: the
            family's own rule (Ideogram 4's 0.5 log(pixels / 512^2)) in place of the scheduler's (default None).
    """

    kind = FLOW_MATCHING

    def __init__(
        self,
        scheduler,
        density: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        loss_weighting: str = "none",
        shift: float | None = None,
        tokens_per_latent: int = 4,
        model_scheduler=None,
        precondition_outputs: bool = False,
        shift_rule=None,
    ):
        if density not in TIMESTEP_DENSITIES:
            raise ValueError(f"model.timestep_density={density!r} is not one of {TIMESTEP_DENSITIES}")
        if loss_weighting not in FLOW_LOSS_WEIGHTINGS:
            raise ValueError(f"model.loss_weighting={loss_weighting!r} is not one of {FLOW_LOSS_WEIGHTINGS}")
        if shift is not None and not shift > 0:
            raise ValueError(f"model.flow_shift={shift}: must be > 0 (or null: the scheduler's)")
        self.scheduler = copy.deepcopy(scheduler)
        self.model_scheduler = copy.deepcopy(model_scheduler) if model_scheduler is not None else self.scheduler
        self.density, self.loss_weighting = density, loss_weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.shift, self.tokens_per_latent = shift, tokens_per_latent
        self.precondition_outputs, self.shift_rule = precondition_outputs, shift_rule
        self.image_shape: tuple[int, ...] | None = None  # the latent shape last noised (resolution-dependent shift)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def dynamic(self) -> bool:
        dynamic = self.shift_rule is not None or bool(self.scheduler.config.get("use_dynamic_shifting", False))
        return self.shift is None and dynamic

    def mu(self, shape) -> float:
        """The resolution-dependent shift exponent of the family's pipelines (``shift_rule``, else diffusers'
        ``calculate_shift``)."""
        if self.shift_rule is not None:
            return self.shift_rule(shape)
        c = self.scheduler.config
        tokens = shape[-2] * shape[-1] / self.tokens_per_latent
        base, top = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        slope = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (top - base)
        return tokens * slope + c.get("base_shift", 0.5) - slope * base

    def sigmas(self, t: torch.Tensor, shape=None) -> torch.Tensor:
        """sigma of timesteps ``t``: the unshifted u = (t + 1) / T, shifted (float32, as diffusers' tables)."""
        u = (t.to(torch.float32) + 1) / self.num_train_timesteps
        if self.dynamic:
            shape = shape or self.image_shape
            if shape is None:
                raise ValueError("a resolution-dependent flow shift needs the latent size of the images")
            return math.exp(self.mu(shape)) / (math.exp(self.mu(shape)) + (1 / u - 1))
        shift = self.shift if self.shift is not None else self.scheduler.config.get("shift", 1.0)
        return shift * u / (1 + (shift - 1) * u)

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.sigmas(t.to(like.device), like.shape).to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, n: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        # diffusers draws u and indexes its descending sigma table with floor(u T): index i is t = T - 1 - i here.
        u = compute_density_for_timestep_sampling(
            self.density if self.density != "uniform" else "none", n, self.logit_mean, self.logit_std,
            self.mode_scale, generator=generator,
        )  # fmt: skip
        index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return (self.num_train_timesteps - 1 - index).to(device)

    def stratified_timesteps(self, n: int, offset: float, device=None) -> torch.Tensor:
        total = self.num_train_timesteps
        return ((torch.arange(n) + offset) * total / n).long().clamp(max=total - 1).to(device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.image_shape = tuple(x0.shape)
        sigma = self._sigma(t, x0)
        return (1 - sigma) * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def predicted_x0(self, prediction: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noisy - self._sigma(t, noisy) * prediction

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas(t).clamp(1e-6, 1 - 1e-6)
        return ((1 - sigma) / sigma) ** 2

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        raise ValueError(
            "model.snr_gamma: min-SNR weighting is defined for DDPM targets; a flow-matching model weights its loss "
            "with model.loss_weighting (none | sigma_sqrt | cosmap)"
        )

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas(t)
        weights = compute_loss_weighting_for_sd3(self.loss_weighting, sigmas)
        if self.precondition_outputs:
            # diffusers' SD3 scripts (--precondition_outputs 1) score the x0 the prediction implies, x_t - sigma v,
            # against x0: that difference is sigma (eps - x0 - v), i.e. the flow loss weighted by sigma^2.
            weights = weights * sigmas**2
        return weights.to(t.device).float()

    def model_timesteps(self, t: torch.Tensor, sample: torch.Tensor | None = None) -> torch.Tensor:
        """1000 sigma (``num_train_timesteps`` x sigma), as the SD3 / Flux pipelines give their transformers."""
        shape = tuple(sample.shape) if sample is not None else None
        return self.sigmas(t, shape).to(t.device) * self.num_train_timesteps

    def fraction(self, t: torch.Tensor) -> torch.Tensor:
        return (t.float() + 1) / self.num_train_timesteps


def noise_process_for(
    scheduler,
    key: str = "model.pretrained",
    prediction_type: str | None = None,
    density: str | None = None,
    flow: dict | None = None,
) -> NoiseProcess:
    """The noise process a model's scheduler describes, refusing an unknown scheduler (naming ``key`` and its
    class). ``density``: the ``model.timestep_density`` setting (DDPM takes only ``uniform``); ``flow``: the
    ``FlowMatchingProcess`` settings (``loss_weighting``, ``shift``, ``logit_mean``, ``logit_std``, ``mode_scale``,
    ``tokens_per_latent``)."""
    try:
        kind = process_kind(scheduler)
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from None
    if kind == FLOW_MATCHING:
        if prediction_type is not None:
            raise ValueError(
                f"model.prediction_type={prediction_type!r}: a flow-matching model predicts eps - x0, nothing else"
            )
        settings = dict(flow or {})
        if not type(scheduler).__name__.startswith("FlowMatch"):
            # Sana ships a DPM-Solver over flow sigmas: train with the Euler flow scheduler of its flow_shift (the
            # shift it samples with; diffusers' Sana script builds its Euler scheduler from this config, which
            # drops flow_shift, and so trains unshifted: model.flow_shift=1.0 reproduces that), sample and export
            # with the model's own.
            from diffusers import FlowMatchEulerDiscreteScheduler

            shift = scheduler.config.get("flow_shift", 1.0)
            settings["model_scheduler"] = scheduler
            scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=scheduler.config.num_train_timesteps, shift=shift
            )
        return FlowMatchingProcess(scheduler, density or "uniform", **settings)
    if density not in (None, "uniform"):
        raise ValueError(f"model.timestep_density={density!r}: a DDPM model draws its timesteps uniformly")
    # Settings of the flow objective only, given explicitly for a DDPM model (a family's default of False is not one).
    flow = flow or {}
    explicit = flow.get("loss_weighting", "none") != "none" or flow.get("shift") is not None
    if explicit or flow.get("precondition_outputs") is True:
        raise ValueError(
            "model.loss_weighting / model.flow_shift / model.precondition_outputs are settings of flow-matching models"
        )
    return DDPMProcess(scheduler, prediction_type)
