"""BNN fine-tuning: DreamBooth in which some weights are Gaussian random variables (docs/methods.md, BNN).

Few-shot fine-tuning passes through a "corruption stage" (fidelity rises, collapses into noisy samples, then recovers
into memorisation); making a subset of weights variational broadens the learned distribution and removes it.
L = L_DreamBooth(theta ~ q) + kl_weight * KL, trained with the same AdamW for mu and sigma.

From the released code:
- ``trainable='full'`` (DreamBooth-BNN): every linear of down/mid/up blocks except ``attn2`` and ``time_emb_proj`` is
  Bayesian (mu = pretrained, sigma = sigma_init, prior N(pretrained, prior_sigma^2)); the rest of the U-Net trains
  as plain full fine-tuning;
- ``trainable='lora'``: only the LoRA up matrix (PEFT ``lora_B``) is Bayesian (mu = 0, prior N(0, prior_sigma^2));
- ``trainable='lora'`` with ``lora_variant='oft'`` (the released OFT recipe, ``OFTRandLinearLayer``): the OFT
  generator R of every adapted projection is Bayesian (mu = 0, the identity rotation; prior N(0, prior_sigma^2)),
  R's full blocks x b x b matrix as released, of which the rotation uses the skew part (``BayesianOFTRotation``);
  the released OFT uses r = 4 blocks (``lora_rank`` 4, the default) and no COFT constraint. DoRA, LoHa and LoKr
  have no released Bayesian form and are refused at construction (``lora_variants``);
- one weight sample per forward; raw sigma clamped to >= 1e-7; sampling and export use the means;
- sigma_init = prior_sigma = 0.01 and **kl_weight = 0 (KL off)** in every released script; the KL the code computes
  is KL(prior || q), summed over all Bayesian elements, negatives zeroed (``kl_form='released'``, ``'sum'``).

Not as released: BNN-OFT rotates with PEFT's OFT (its Cayley-Neumann series, PEFT's default, where the released layer
inverts exactly: the same rotation to fourth order in the generator, which starts at 0).

Inferred (not in the released scripts): ``kl_form='textbook'`` (the ELBO's KL(q || prior)) and
``kl_reduction='mean'`` (per-element mean, the scale at which a sweep of kl_weight in {1e-4, 1e-3} makes sense).
"""

from __future__ import annotations

import torch

from lightning_ft.core.trainable import has_lora, merged_copy
from lightning_ft.methods.dreambooth import DreamBooth
from lightning_ft.nn.bayesian import (
    KL_FORMS,
    KL_REDUCTIONS,
    bayesian_kl,
    bayesian_layers,
    convert_lora_to_bayesian,
    convert_oft_to_bayesian,
    convert_to_bayesian,
    plain_copy,
    plain_layers,
)


class BayesianFineTuning(DreamBooth):
    """DreamBooth (with prior preservation) with variational Bayesian layers.

    Args:
        sigma_init: initial posterior std of every Bayesian element (default 0.01, released).
        prior_sigma: prior std (default 0.01, released).
        kl_weight: weight of the KL term (default 0.0: off, as in the released scripts; ``loss/kl`` is still computed
            and logged, on the steps the logger writes).
        kl_form: ``released`` = KL(prior || q) as the released code computes it, or ``textbook`` = KL(q || prior)
            (default ``released``).
        kl_reduction: ``sum`` over every Bayesian element (released) or ``mean`` per element (inferred)
            (default ``sum``).
        bayesian_include, bayesian_exclude: module-name patterns selecting the Bayesian linears for
            ``trainable='full'`` (fnmatch globs, or regexes prefixed ``re:``; see ``lightning_ft.nn.bayesian``)
            (default None = released selection: down/mid/up blocks minus ``attn2`` and ``time_emb_proj``).
        **kwargs: see ``DreamBooth`` and ``DiffusionBase``; ``trainable`` must be ``full`` or ``lora``, and with
            ``lora`` ``lora_variant`` must be ``lora`` (Bayesian up matrices) or ``oft`` (Bayesian OFT generators),
            the two forms the released code has.
    """

    trains_controlnets = False  # its Bayesian layers are the denoiser's (or its LoRA's)

    #: The ``model.lora_variant`` values with a released Bayesian form (LoRA's up matrix, OFT's generator R).
    lora_variants = ("lora", "oft")

    def __init__(
        self,
        *args,
        sigma_init: float = 0.01,
        prior_sigma: float = 0.01,
        kl_weight: float = 0.0,
        kl_form: str = "released",
        kl_reduction: str = "sum",
        bayesian_include: list[str] | None = None,
        bayesian_exclude: list[str] | None = None,
        **kwargs,
    ):
        if kl_form not in KL_FORMS:
            raise ValueError(f"model.kl_form={kl_form!r} is not one of {KL_FORMS}")
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"model.kl_reduction={kl_reduction!r} is not one of {KL_REDUCTIONS}")
        variant = kwargs.get("lora_variant", "lora")
        if kwargs.get("trainable") == "lora" and variant not in self.lora_variants:
            # Before any component loads. DoRA would run (its lora_B is a linear) but wrongly: PEFT's DoRA norm reads
            # lora_B.weight, the mean, while the output uses a sample.
            raise ValueError(
                f"model.lora_variant={variant!r}: {type(self).__name__} (BNN) has a Bayesian form only for "
                f"{self.lora_variants} (the released code's LoRA up matrix and OFT generator)"
            )
        super().__init__(*args, **kwargs)

    def configure_trainable(self) -> None:
        """Apply ``trainable`` (DiffusionBase), then make the released selection Bayesian."""
        super().configure_trainable()
        h = self.hparams
        if h.trainable == "full":
            # Unset: the model family's selection (the released rule on UNets; transformers' is inferred).
            include = h.bayesian_include if h.bayesian_include is not None else self.family.bnn_include
            exclude = h.bayesian_exclude if h.bayesian_exclude is not None else self.family.bnn_exclude
            self.bayesian_names = convert_to_bayesian(
                self.denoiser, include, exclude, h.sigma_init, h.prior_sigma, "pretrained"
            )
        elif h.trainable == "lora":
            if h.bayesian_include is not None or h.bayesian_exclude is not None:
                raise ValueError(
                    "model.bayesian_include/bayesian_exclude select layers for trainable='full'; with 'lora' every "
                    "LoRA up matrix (OFT: generator) is Bayesian (choose the layers with model.lora_target_modules)"
                )
            convert = convert_oft_to_bayesian if h.lora_variant == "oft" else convert_lora_to_bayesian
            self.bayesian_names = convert(self.denoiser, h.sigma_init, h.prior_sigma)
        else:
            raise ValueError(f"BayesianFineTuning needs model.trainable='full' or 'lora', not {h.trainable!r}")
        for layer in bayesian_layers(self.denoiser).values():
            layer.requires_grad_(True)  # mu and sigma train with the same optimizer (released)

    def kl(self) -> torch.Tensor:
        """The KL term of the current posterior (``kl_form``, ``kl_reduction``)."""
        return bayesian_kl(self.denoiser, self.hparams.kl_form, self.hparams.kl_reduction)

    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, logs = super().training_loss(batch)
        weight = self.hparams.kl_weight
        if weight:
            kl = self.kl()
            loss = loss + weight * kl
            logs["loss/kl"] = kl.detach()
        elif self.logs_are_written():
            # With the KL off (released default) it is only a diagnostic: no graph, and only on the steps whose
            # logs the trainer writes (about nine elementwise passes over every Bayesian element saved elsewhere).
            with torch.no_grad():
                logs["loss/kl"] = self.kl()
        return loss, logs

    # --------------------------------------------------------------------------------------------------- export
    def exportable_denoiser(self) -> torch.nn.Module:
        """A plain diffusers denoiser with weights = means: a copy of ``self.denoiser`` with every Bayesian layer
        turned into its plain version (and, for LoRA / OFT, the adapter merged into the copy). The training module
        keeps its Bayesian layers, so training and sampling can go on after an export."""
        plain = plain_copy(self.denoiser)
        return merged_copy(plain) if has_lora(plain) else plain

    def exportable_lora_state(self) -> dict[str, torch.Tensor]:
        """Plain adapter weights holding the means (LoRA up = mu; OFT generator = the skew part of mu): the
        Bayesian layers are swapped for plain ones meanwhile, as the released code writes its checkpoints back."""
        with plain_layers(self.denoiser):
            return {k: v.clone() for k, v in super().exportable_lora_state().items()}
