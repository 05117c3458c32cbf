"""Large-model settings: the FSDP strategy and its config fragment, frozen parts in bf16, the EMA kept on the CPU.

torch's FSDP refuses to run without an accelerator ("FSDP needs a non-CPU accelerator device"), so here the
strategy is built and checked, not run; the other settings run on the tiny models."""

from __future__ import annotations

import torch
from conftest import REPO, quiet_trainer, tiny_module, write_images
from diffusers.models.attention import JointTransformerBlock

from lightning_ft.methods import DreamBooth, SelfDistillationFineTuning
from lightning_ft.run import main
from lightning_ft.strategies import DiffusionFSDP


def test_the_fsdp_fragment_builds_the_strategy_with_one_unit_per_transformer_block(tmp_path, subject_dir):
    data = tmp_path / "data.yaml"
    data.write_text(f"data:\n  init_args:\n    instance_dir: {subject_dir}\n    num_class_images: 0\n")
    configs = ["experiments/dreambooth_lora.yaml", "configs/model/tiny_sd3.yaml", "configs/trainer/fsdp.yaml",
               "configs/model/large_model.yaml"]  # fmt: skip
    args = [a for c in configs for a in ("--config", str(REPO / c))] + ["--config", str(data)]
    cli = main([*args, "--trainer.accelerator", "cpu", "--trainer.devices", "1"], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DiffusionFSDP)
    assert JointTransformerBlock in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert strategy.kwargs["use_orig_params"] and strategy._state_dict_type == "full"
    assert strategy._activation_checkpointing_kwargs  # the fragment turns block checkpointing on
    assert cli.model.hparams.frozen_dtype == "bfloat16" and cli.model.hparams.ema_offload
    assert cli.model.vae.dtype == torch.bfloat16 and cli.model.denoiser.dtype == torch.float32


def test_frozen_parts_in_bf16_feed_an_fp32_denoiser_and_teacher():
    torch.manual_seed(0)
    module = tiny_module(SelfDistillationFineTuning, frozen_dtype="bfloat16")
    assert module.vae.dtype == module.text_encoder.dtype == module.frozen_denoiser.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "prompts": ["a red star", "a blue circle"]}
    module.train()
    loss, logs = module.training_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and logs["loss/distill"] >= 0
    assert all(p.grad is not None for p in module.trainable_parameters() if p.requires_grad)
    # Close to the fp32 model's loss on the same draws (bf16 encoders: ~3 significant digits).
    torch.manual_seed(0)
    full = tiny_module(SelfDistillationFineTuning)
    full.train()
    torch.manual_seed(1)
    reference, _ = full.training_loss(batch)
    torch.manual_seed(1)
    again, _ = module.training_loss(batch)
    assert abs(again.item() - reference.item()) < 0.05 * reference.item()


def test_an_offloaded_ema_lives_on_the_cpu_and_gives_the_same_weights(tmp_path):
    images = write_images(tmp_path / "images", 2)
    from lightning_ft.data import LimitedDataModule

    def fit(offload: bool):
        torch.manual_seed(0)
        module = tiny_module(DreamBooth, ema_decay=0.9, ema_offload=offload, lr=1e-3)
        data = LimitedDataModule(str(images), instance_prompt="a sks star", resolution=32, batch_size=2, repeats=2)
        quiet_trainer(max_steps=3).fit(module, data)
        return module

    offloaded, plain = fit(True), fit(False)
    assert all(p.device.type == "cpu" for p in offloaded.ema.shadow_params)
    for a, b in zip(offloaded.ema.shadow_params, plain.ema.shadow_params):
        torch.testing.assert_close(a, b)
    assert offloaded.ema.optimization_step == 3
