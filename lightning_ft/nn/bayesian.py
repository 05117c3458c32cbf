"""Variational Bayesian linear layers for BNN fine-tuning (docs/methods.md, BNN).

A ``BayesianLinear`` holds a factorised Gaussian q(W) = N(mu, sigma^2) over its weight and bias. Following the
released code:

- sigma is stored raw (no softplus / log) and clamped in place to ``>= SIGMA_MIN`` (1e-7) before every use, so an
  optimizer step that pushes it negative is undone at the next forward;
- in training mode every forward draws one fresh weight sample W = mu + sigma * eps, eps ~ N(0, I) of the weight's
  shape, shared by the whole batch (no local reparameterisation); in eval mode the layer uses mu, so sampling and
  export cost exactly what the pretrained layer costs;
- mu starts at the pretrained weight and sigma at a constant ``sigma_init``; the prior is N(prior_mean, prior_sigma^2)
  with prior_mean the pretrained weight (full-weight BNN) or zero (Bayesian LoRA up matrix).

OFT (``convert_oft_to_bayesian``): the released code makes the OFT generator R Bayesian (``BayesianOFTRotation``,
docs/methods.md, BNN: "OFT recipe").

Layer selection (``convert_to_bayesian``) takes patterns over dotted module names: a plain pattern is an
``fnmatch`` glob (``*`` also crosses dots), a pattern starting with ``re:`` is a Python regex that must match the
whole name. ``convert_to_plain`` and ``plain_copy`` turn Bayesian layers back into plain ones holding the means
(``nn.Linear``; PEFT's ``OFTRotationModule`` for OFT).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import re
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SIGMA_MIN = 1e-7
KL_FORMS = ("released", "textbook")
KL_REDUCTIONS = ("sum", "mean")
#: Released DreamBooth-BNN selection: every linear of the U-Net blocks except cross-attention and time projections.
DEFAULT_INCLUDE = ("down_blocks.*", "mid_block.*", "up_blocks.*")
DEFAULT_EXCLUDE = ("*.attn2.*", "*.time_emb_proj")


class BayesianModule(nn.Module):
    """What every Bayesian layer shares: Gaussian (mu, sigma) pairs with a N(prior mean, ``prior_sigma``^2) prior
    (``pairs``), the sigma clamp, the KL; a subclass says how it samples and what plain layer it turns into
    (``to_plain``)."""

    #: Its weight is sampled in training (read by code that must not treat it as a plain layer).
    stochastic = True
    prior_sigma: float

    def pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, torch.Tensor | None]]:
        """(mu, sigma, prior mean or None for zero) of every Bayesian tensor."""
        raise NotImplementedError

    def to_plain(self) -> nn.Module:
        """The deterministic layer holding the means (a copy)."""
        raise NotImplementedError

    @property
    def num_bayesian(self) -> int:
        """Number of Bayesian elements (weight and bias entries)."""
        return sum(mu.numel() for mu, _, _ in self.pairs())

    def clamp_sigma_(self) -> None:
        """sigma <- max(sigma, SIGMA_MIN) in place, as the released code does before each use.

        Through ``.data``: autograd's version counter is not bumped, so a graph already holding sigma (the KL term,
        gradient-checkpoint recomputation) stays valid; values only change right after an optimizer step."""
        for _, sigma, _ in self.pairs():
            sigma.data.clamp_(min=SIGMA_MIN)

    def kl_terms(self, form: str = "released") -> list[torch.Tensor]:
        """Elementwise closed-form KL between q = N(mu, sigma^2) and the prior p = N(m, prior_sigma^2), one tensor
        per parameter (weight, bias), in float32.

        ``released``: KL(p || q) = log(sigma/sp) + sp^2/(2 sigma^2) + (m - mu)^2/(2 sigma^2) - 1/2 with negative
        entries zeroed, as the released code computes it (arguments swapped vs. the ELBO). ``textbook``:
        KL(q || p) = log(sp/sigma) + (sigma^2 + (mu - m)^2)/(2 sp^2) - 1/2. Both are 0 iff q equals the prior."""
        if form not in KL_FORMS:
            raise ValueError(f"kl form={form!r} is not one of {KL_FORMS}")
        self.clamp_sigma_()
        sp = self.prior_sigma
        terms = []
        for mu, sigma, prior in self.pairs():
            mu, sigma = mu.float(), sigma.float()
            diff2 = (mu - prior.float()) ** 2 if prior is not None else mu**2
            if form == "released":
                kl = torch.log(sigma) - math.log(sp) + (sp**2 + diff2) / (2 * sigma**2) - 0.5
                terms.append(kl.clamp(min=0.0))
            else:
                terms.append(math.log(sp) - torch.log(sigma) + (sigma**2 + diff2) / (2 * sp**2) - 0.5)
        return terms

    def kl(self, form: str = "released", reduction: str = "sum") -> torch.Tensor:
        """KL of this layer, summed or averaged over its Bayesian elements (see ``kl_terms``; defaults
        ``released``, ``sum``)."""
        if reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl reduction={reduction!r} is not one of {KL_REDUCTIONS}")
        total = sum(t.sum() for t in self.kl_terms(form))
        return total / self.num_bayesian if reduction == "mean" else total


class BayesianLinear(BayesianModule):
    """A linear layer with a Gaussian variational posterior over weight and bias.

    Build it with ``BayesianLinear.from_linear``. Parameters: ``weight_mu``, ``weight_sigma`` and, when the source
    layer has a bias, ``bias_mu``, ``bias_sigma``. With ``prior_mean='pretrained'`` the prior means are the
    non-persistent buffers ``weight_prior_mu`` / ``bias_prior_mu`` (they come from the pretrained model, so
    checkpoints need not hold them); with ``'zero'`` nothing is stored.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        sigma_init: float = 0.01,
        prior_sigma: float = 0.01,
        prior_mean: str = "pretrained",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if prior_mean not in ("pretrained", "zero"):
            raise ValueError(f"prior_mean={prior_mean!r} is not 'pretrained' or 'zero'")
        if sigma_init <= 0 or prior_sigma <= 0:
            raise ValueError(f"sigma_init={sigma_init} and prior_sigma={prior_sigma} must be positive")
        self.in_features, self.out_features = in_features, out_features
        self.prior_sigma, self.prior_mean = float(prior_sigma), prior_mean
        factory = {"device": device, "dtype": dtype}
        self.weight_mu = nn.Parameter(torch.zeros(out_features, in_features, **factory))
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), float(sigma_init), **factory))
        self.bias_mu = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.bias_sigma = nn.Parameter(torch.full((out_features,), float(sigma_init), **factory)) if bias else None
        if prior_mean == "pretrained":
            self.register_buffer("weight_prior_mu", torch.zeros(out_features, in_features, **factory), False)
            self.register_buffer("bias_prior_mu", torch.zeros(out_features, **factory) if bias else None, False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, sigma_init: float = 0.01, prior_sigma: float = 0.01, prior_mean: str = "pretrained"
    ) -> BayesianLinear:
        """A Bayesian copy of ``linear``: mu = its weights, sigma = ``sigma_init`` (default 0.01), prior
        N(its weights or 0, ``prior_sigma``^2) (defaults 0.01, ``'pretrained'``). ``requires_grad`` of mu and sigma
        follows the source weight, the train/eval mode the source layer (a layer converted inside a model in eval
        mode uses its means until the model is put in training mode)."""
        w, b = linear.weight, linear.bias
        shape = (linear.in_features, linear.out_features, b is not None)
        layer = cls(*shape, sigma_init, prior_sigma, prior_mean, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight_mu.copy_(w)
            if b is not None:
                layer.bias_mu.copy_(b)
            if prior_mean == "pretrained":
                layer.weight_prior_mu.copy_(w)
                if b is not None:
                    layer.bias_prior_mu.copy_(b)
        layer.requires_grad_(w.requires_grad)
        return layer.train(linear.training)

    # Read-only means under the nn.Linear names, for code that inspects ``.weight`` (dtype checks, PEFT merging).
    @property
    def weight(self) -> torch.Tensor:
        return self.weight_mu

    @property
    def bias(self) -> torch.Tensor | None:
        return self.bias_mu

    def pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, torch.Tensor | None]]:
        """(mu, sigma, prior mean or None for zero) for the weight and, if present, the bias."""
        pretrained = self.prior_mean == "pretrained"
        out = [(self.weight_mu, self.weight_sigma, self.weight_prior_mu if pretrained else None)]
        if self.bias_mu is not None:
            out.append((self.bias_mu, self.bias_sigma, self.bias_prior_mu if pretrained else None))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x, self.weight_mu, self.bias_mu)
        self.clamp_sigma_()
        # One weight sample per call, shared by the batch (W = mu + sigma * eps), as in the released layer.
        # addcmul: one pass instead of a multiply and an add; autograd gives d/dmu = g and d/dsigma = g * eps.
        sampled = [torch.addcmul(mu, sigma, torch.randn_like(mu)) for mu, sigma, _ in self.pairs()]
        return F.linear(x, sampled[0], sampled[1] if len(sampled) > 1 else None)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the means (a copy; ``requires_grad`` follows mu)."""
        mu = self.weight_mu
        linear = nn.Linear(self.in_features, self.out_features, self.bias_mu is not None, mu.device, mu.dtype)
        with torch.no_grad():
            linear.weight.copy_(mu)
            if self.bias_mu is not None:
                linear.bias.copy_(self.bias_mu)
        return linear.requires_grad_(mu.requires_grad)

    def to_plain(self) -> nn.Linear:
        return self.to_linear()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias_mu is not None}, "
            f"prior_mean={self.prior_mean}, prior_sigma={self.prior_sigma}"
        )


class BayesianOFTRotation(BayesianModule):
    """The OFT generator of one PEFT OFT layer as a Gaussian variational posterior, as the released BNN-OFT layer
    (``OFTRandLinearLayer``) holds it.

    The released layer keeps a full matrix R (blocks x b x b) with mu = 0 (the identity rotation), sigma =
    ``sigma_init`` and prior N(0, ``prior_sigma``^2) on every entry; each forward in training draws
    R = mu + sigma * eps and rotates with the Cayley transform of its skew part 0.5 (R - R^T). PEFT's
    ``OFTRotationModule`` stores only that skew part, as the b(b-1)/2 entries above the diagonal (``weight``). So
    mu and sigma here have the released full shape, and the vector PEFT's rotation receives is the upper triangle of
    0.5 (R - R^T): the rotation, its noise at init (std sigma / sqrt 2 per skew entry) and the KL (summed over every
    entry of R, diagonal included) are the released ones. The rotation itself is PEFT's (its Cayley-Neumann series,
    PEFT's default, where the released code inverts exactly; the same map to fourth order in the generator).

    ``weight`` (read by PEFT's OFT layer for its dtype, and by its merge) is the mean's skew vector; in eval mode the
    rotation uses the mean. ``to_plain`` gives PEFT's ``OFTRotationModule`` holding it, which merges and saves as
    any OFT adapter.
    """

    def __init__(self, rotation: nn.Module, sigma_init: float = 0.01, prior_sigma: float = 0.01):
        super().__init__()
        if sigma_init <= 0 or prior_sigma <= 0:
            raise ValueError(f"sigma_init={sigma_init} and prior_sigma={prior_sigma} must be positive")
        vector = rotation.weight
        blocks, size = vector.shape[0], rotation.block_size
        self.prior_sigma = float(prior_sigma)
        factory = {"device": vector.device, "dtype": vector.dtype}
        self.weight_mu = nn.Parameter(torch.zeros(blocks, size, size, **factory))
        self.weight_sigma = nn.Parameter(torch.full((blocks, size, size), float(sigma_init), **factory))
        rows, cols = torch.triu_indices(size, size, 1, device=vector.device)
        with torch.no_grad():  # mu's skew part is the generator PEFT held (zero when fresh: the released init)
            self.weight_mu[:, rows, cols] = vector
            self.weight_mu[:, cols, rows] = -vector
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        # PEFT's rotation, without its own generator: each call gets the vector of this layer's R (``_generator``).
        self.rotation = copy.deepcopy(rotation)
        del self.rotation._parameters["weight"]
        self.requires_grad_(vector.requires_grad)
        self.train(rotation.training)

    def skew_vector(self, matrix: torch.Tensor) -> torch.Tensor:
        """The upper triangle of 0.5 (R - R^T), the layout of PEFT's OFT ``weight``."""
        return 0.5 * (matrix[:, self.rows, self.cols] - matrix[:, self.cols, self.rows])

    @property
    def weight(self) -> torch.Tensor:
        return self.skew_vector(self.weight_mu)

    def pairs(self) -> list[tuple[nn.Parameter, nn.Parameter, torch.Tensor | None]]:
        return [(self.weight_mu, self.weight_sigma, None)]

    @contextlib.contextmanager
    def _generator(self, vector: torch.Tensor):
        # PEFT's rotation reads ``self.weight``: lend it this vector (a graph tensor: gradients reach mu and sigma).
        self.rotation.weight = vector
        try:
            yield self.rotation
        finally:
            del self.rotation.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.clamp_sigma_()
            # One sample of R per call, shared by the batch, as the released layer (and BayesianLinear).
            matrix = torch.addcmul(self.weight_mu, self.weight_sigma, torch.randn_like(self.weight_mu))
        else:
            matrix = self.weight_mu
        with self._generator(self.skew_vector(matrix)) as rotation:
            return rotation(x)

    def get_weight(self) -> torch.Tensor:
        """The block-diagonal rotation of the mean (PEFT's ``get_weight``; what a merge multiplies in)."""
        with self._generator(self.weight) as rotation:
            return rotation.get_weight()

    def to_plain(self) -> nn.Module:
        """PEFT's ``OFTRotationModule`` with ``weight`` = the mean's skew vector (a copy; ``requires_grad``
        follows mu)."""
        plain = copy.deepcopy(self.rotation)
        mu = self.weight_mu
        plain.weight = nn.Parameter(self.skew_vector(mu).detach().clone(), requires_grad=mu.requires_grad)
        return plain.train(self.training)

    def extra_repr(self) -> str:
        blocks, size, _ = self.weight_mu.shape
        return f"blocks={blocks}, block_size={size}, prior_sigma={self.prior_sigma}"


# ------------------------------------------------------------------------------------------------ model-level
def _matches(name: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    # setattr also works for ModuleDict / Sequential children ("lora_B.default", "to_out.0").
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def convert_to_bayesian(
    denoiser: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    sigma_init: float = 0.01,
    prior_sigma: float = 0.01,
    prior_mean: str = "pretrained",
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose dotted name matches ``include`` and not ``exclude`` by a
    ``BayesianLinear`` (mu = its weights). Returns the converted names.

    Defaults (None): the released DreamBooth-BNN selection ``DEFAULT_INCLUDE`` / ``DEFAULT_EXCLUDE``, each
    separately: everything in ``down_blocks``, ``mid_block``, ``up_blocks`` except cross-attention ``attn2`` and
    ``time_emb_proj``; in a diffusers U-Net that is the self-attention ``attn1.to_q/to_k/to_v/to_out.0`` and
    ``ff.net.0.proj``, ``ff.net.2`` of every transformer block (plus ``proj_in/proj_out`` on models where those are
    linear, as the released rule would do). Other denoisers' selections are their model family's (``bnn_include``,
    ``bnn_exclude``), which ``BayesianFineTuning`` passes. Meant for a denoiser without LoRA adapters (see
    ``convert_lora_to_bayesian``). Raises ValueError, naming ``model.bayesian_include`` /
    ``model.bayesian_exclude``, if nothing matched."""
    include = DEFAULT_INCLUDE if include is None else tuple(include)
    exclude = DEFAULT_EXCLUDE if exclude is None else tuple(exclude)
    names = [
        n
        for n, m in denoiser.named_modules()
        if isinstance(m, nn.Linear) and _matches(n, include) and not _matches(n, exclude)
    ]
    if not names:
        raise ValueError(
            f"convert_to_bayesian: no nn.Linear matched include={list(include)} exclude={list(exclude)} in "
            f"{type(denoiser).__name__}: set model.bayesian_include / model.bayesian_exclude to patterns over its "
            "module names"
        )
    for name in names:
        layer = BayesianLinear.from_linear(denoiser.get_submodule(name), sigma_init, prior_sigma, prior_mean)
        _replace(denoiser, name, layer)
    return names


def convert_lora_to_bayesian(denoiser: nn.Module, sigma_init: float = 0.01, prior_sigma: float = 0.01) -> list[str]:
    """Make the up matrix (PEFT ``lora_B``) of every LoRA adapter Bayesian, in place; ``lora_A`` stays deterministic.

    mu keeps PEFT's zero init, sigma = ``sigma_init``, prior N(0, ``prior_sigma``^2) (released Bayesian LoRA).
    PEFT's forward calls ``self.lora_B[adapter](...)``, so the replacement slots in unchanged; convert back
    (``convert_to_plain`` / ``plain_copy``) before merging or saving LoRA weights. Returns the converted names."""
    from peft.tuners.lora import LoraLayer

    names = []
    for prefix, module in list(denoiser.named_modules()):
        if isinstance(module, LoraLayer):
            for adapter, up in module.lora_B.items():
                if isinstance(up, nn.Linear):
                    module.lora_B[adapter] = BayesianLinear.from_linear(up, sigma_init, prior_sigma, "zero")
                    names.append(f"{prefix}.lora_B.{adapter}")
    if not names:
        raise ValueError("convert_lora_to_bayesian: the denoiser has no PEFT LoRA layer with a linear up matrix")
    return names


def convert_oft_to_bayesian(denoiser: nn.Module, sigma_init: float = 0.01, prior_sigma: float = 0.01) -> list[str]:
    """Make the generator of every PEFT OFT adapter Bayesian (``BayesianOFTRotation``), in place: mu = 0 (the
    identity rotation; the generator PEFT held, if it was not fresh), sigma = ``sigma_init``, prior
    N(0, ``prior_sigma``^2), as the released BNN-OFT. PEFT's OFT layer calls ``self.oft_R[adapter](x)``, so the
    replacement slots in unchanged; convert back (``convert_to_plain`` / ``plain_copy``) before saving adapter
    weights. Returns the converted names."""
    from peft.tuners.oft.layer import OFTLayer, OFTRotationModule

    names = []
    for prefix, module in list(denoiser.named_modules()):
        if isinstance(module, OFTLayer):
            for adapter, rotation in module.oft_R.items():
                if isinstance(rotation, OFTRotationModule):
                    module.oft_R[adapter] = BayesianOFTRotation(rotation, sigma_init, prior_sigma)
                    names.append(f"{prefix}.oft_R.{adapter}")
    if not names:
        raise ValueError("convert_oft_to_bayesian: the denoiser has no PEFT OFT layer (model.lora_variant='oft')")
    return names


def bayesian_layers(module: nn.Module) -> dict[str, BayesianModule]:
    return {n: m for n, m in module.named_modules() if isinstance(m, BayesianModule)}


def convert_to_plain(module: nn.Module) -> list[str]:
    """Replace, in place, every Bayesian layer by its plain version holding the means (``nn.Linear``, or PEFT's
    OFT rotation); returns the names."""
    layers = bayesian_layers(module)
    for name, layer in layers.items():
        _replace(module, name, layer.to_plain())
    return list(layers)


@contextlib.contextmanager
def plain_layers(module: nn.Module):
    """Within this block every Bayesian layer of ``module`` is swapped for its plain version holding the means;
    the Bayesian layers (same objects, untouched) are put back on exit. For reading plain weights in place."""
    layers = bayesian_layers(module)
    try:
        for name, layer in layers.items():
            _replace(module, name, layer.to_plain())
        yield module
    finally:
        for name, layer in layers.items():
            _replace(module, name, layer)


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every Bayesian layer in its plain version (means); ``module`` is untouched.

    sigma and the prior buffers are not copied: each Bayesian layer maps to its plain version in the deepcopy memo."""
    memo = {id(layer): layer.to_plain() for layer in bayesian_layers(module).values()}
    return copy.deepcopy(module, memo)


def bayesian_kl(module: nn.Module, form: str = "released", reduction: str = "sum") -> torch.Tensor:
    """KL of all Bayesian layers in ``module``: summed over every Bayesian element (``sum``, released) or divided
    by their total count (``mean``). A zero tensor when there is no Bayesian layer."""
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl reduction={reduction!r} is not one of {KL_REDUCTIONS}")
    total, count = torch.zeros(()), 0
    # Layer by layer, so only one layer's elementwise terms are alive at a time.
    for layer in bayesian_layers(module).values():
        total = total.to(layer.weight_mu.device) + layer.kl(form, "sum")
        count += layer.num_bayesian
    return total / count if reduction == "mean" and count else total
