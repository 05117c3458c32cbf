"""``DiffusionFSDP``: Lightning's FSDP strategy with the defaults a diffusion denoiser needs.

Models too large for DDP (Flux, SD3.5 Large) are trained with Fully Sharded Data Parallel: parameters, gradients and
optimizer state are sharded across the ranks. Lightning's ``FSDPStrategy`` does the work; this subclass only sets
what a diffusion fine-tune needs by default:

- ``auto_wrap_policy``: every transformer block a model family declares (``ModelFamily.fsdp_blocks``: UNet/DiT/PixArt
  ``BasicTransformerBlock``, SD3's ``JointTransformerBlock``, Flux's double and single blocks, ...) is its own FSDP
  unit, so that only
  one block's full weights are gathered at a time; ``activation_checkpointing_policy`` the same blocks when
  ``activation_checkpointing=True``;
- ``use_orig_params=True``: frozen and trainable weights (LoRA, A3FTA adapters, BNN) share units, and parameter
  names stay those of the model, so checkpoints keep only the trainable weights as under DDP;
- ``state_dict_type="full"``: checkpoints hold plain (gathered) tensors.

The export (``DiffusersExport``) gathers the full weights on every rank and writes them from rank 0. Callbacks that
sample during training (monitors, sample grids) run on rank 0 only, which FSDP cannot do (every rank must take part
in each forward): leave them out of FSDP runs and sample the export instead. See ``configs/trainer/fsdp.yaml``.
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy


def transformer_blocks() -> set[type]:
    """The block classes the model families declare as FSDP units (``ModelFamily.fsdp_blocks``), those the installed
    diffusers has."""
    from lightning_ft.core.families import fsdp_block_classes

    return fsdp_block_classes()


class DiffusionFSDP(FSDPStrategy):
    """``FSDPStrategy`` with the module docstring's defaults; every other argument is Lightning's.

    Args:
        auto_wrap_policy: default None: every diffusers transformer block its own unit.
        activation_checkpointing: recompute the blocks' activations in the backward pass (default False).
        use_orig_params: default True (see the module docstring).
        state_dict_type: default ``full``.
        **kwargs: ``FSDPStrategy``'s (``sharding_strategy``, ``cpu_offload``, ``mixed_precision``, ...).
    """

    def __init__(
        self,
        auto_wrap_policy=None,
        activation_checkpointing: bool = False,
        use_orig_params: bool = True,
        state_dict_type: str = "full",
        **kwargs,
    ):
        blocks = transformer_blocks()
        # (The CLI passes every FSDPStrategy argument, unset ones as None: a None policy is not a choice.)
        if activation_checkpointing and kwargs.get("activation_checkpointing_policy") is None:
            kwargs["activation_checkpointing_policy"] = blocks
        super().__init__(
            auto_wrap_policy=auto_wrap_policy or blocks,
            use_orig_params=use_orig_params,
            state_dict_type=state_dict_type,
            **kwargs,
        )
