"""Regressions found in review: each test failed before its fix."""

from __future__ import annotations

import os

import lightning as L
import torch
from conftest import quiet_trainer, tiny_module, write_images
from diffusers import DiffusionPipeline
from diffusers.training_utils import compute_snr

from lightning_ft.callbacks.export import DiffusersExport
from lightning_ft.core.base import DiffusionBase
from lightning_ft.data import LimitedDataModule

PROMPTS = ["a red star on a gray background", "a sks star on a navy background"]

CLASS_UNET = {
    "denoiser": {
        "class": "UNet2DModel",
        "config": {
            "sample_size": 16,
            "in_channels": 3,
            "out_channels": 3,
            "layers_per_block": 1,
            "block_out_channels": [8, 16],
            "down_block_types": ["DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D"],
            "norm_num_groups": 4,
            "num_class_embeds": 3,
        },
    },
    "scheduler": {"class": "DDPMScheduler", "config": {"num_train_timesteps": 1000, "clip_sample": False}},
}


def test_min_snr_weight_of_an_x0_loss_is_min_snr_gamma():
    # Min-SNR (Hang et al. 2023) and diffusers' train_text_to_image.py: x0 loss weight = min(SNR, gamma);
    # only epsilon (/SNR) and v (/(SNR+1)) losses are divided.
    module = tiny_module(prediction_type="sample", snr_gamma=5.0)
    t = torch.tensor([0, 100, 500, 900])
    snr = compute_snr(module.noise_scheduler, t)
    assert torch.allclose(module.timestep_weights(t), snr.clamp(max=5.0))


def test_ema_steps_once_per_optimizer_step_under_gradient_accumulation(subject_dir):
    torch.manual_seed(0)
    module = tiny_module(ema_decay=0.9, lr=1e-3, trainable="lora")
    trainer = quiet_trainer(max_steps=2, accumulate_grad_batches=2)
    data = LimitedDataModule(str(subject_dir), instance_prompt="a sks star", resolution=32, batch_size=1, repeats=4)
    trainer.fit(module, data)
    assert trainer.global_step == 2
    assert module.ema.optimization_step == 2  # was 4: one EMA update per micro-batch


def test_lora_only_export_keeps_lora_alpha(tmp_path):
    torch.manual_seed(0)
    module = tiny_module(trainable="lora", lora_rank=2, lora_alpha=8)  # scale alpha / rank = 4, not 1
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], steps=2, guidance_scale=1.5)
    module.save_pretrained(tmp_path / "lora", lora_only=True)
    torch.manual_seed(0)
    tiny_module().save_pretrained(tmp_path / "base")  # the same random base weights
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(tmp_path / "lora")
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    got = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.5, generator=generators, output_type="pt").images
    assert torch.allclose(got.float(), expected, atol=1e-4)


def test_evaluation_loss_spreads_timesteps_over_single_image_batches_and_ignores_global_rng():
    torch.manual_seed(0)
    module = tiny_module()
    module.eval()
    seen = []
    original = module.diffusion_loss

    def spy(x0, condition, timesteps=None, noise=None, weighted=True):
        seen.append(timesteps.tolist())
        return original(x0, condition, timesteps, noise, weighted)

    module.diffusion_loss = spy
    batch = {"pixel_values": torch.rand(1, 3, 32, 32) * 2 - 1, "prompts": ["a sks star"]}
    losses = []
    for batch_idx in range(4):
        torch.manual_seed(100 + batch_idx)  # a different global RNG state every time
        losses.append(module.evaluation_loss(batch, batch_idx=0))
        module.evaluation_loss(batch, batch_idx=batch_idx)
    assert len({t[0] for t in seen[1::2]}) > 1, f"every single-image batch scored at the same timestep: {seen}"
    assert all(seen[0] == t for t in seen[0::2]), "the same batch index must give the same timesteps"
    assert all(torch.equal(losses[0], loss) for loss in losses), "eval loss must not depend on the global RNG"


class _Rank1Trainer:
    """A non-zero DDP rank: reading ``log_dir`` is a collective (``strategy.broadcast``) that every rank must join."""

    is_global_zero = False
    default_root_dir = "."

    def __init__(self, folder):
        self.folder, self.log_dir_reads = folder, 0

    @property
    def log_dir(self):
        self.log_dir_reads += 1
        return str(self.folder)


def test_export_callback_joins_the_log_dir_collective_on_every_rank(tmp_path):
    class _NoExport:
        def save_pretrained(self, *args, **kwargs):
            raise AssertionError("only rank 0 exports")

    trainer = _Rank1Trainer(tmp_path)
    DiffusersExport().on_fit_end(trainer, _NoExport())
    assert trainer.log_dir_reads == 1  # was 0: rank 0 waited alone in the broadcast (DDP hang)


def test_model_identity_changes_when_a_component_folder_is_rewritten(tmp_path):
    torch.manual_seed(0)
    tiny_module().vae.save_pretrained(tmp_path / "vae")
    components = {k: v for k, v in tiny_module().hparams.components.items()}
    components["vae"] = {"pretrained": str(tmp_path / "vae")}
    module = DiffusionBase(components=components)
    before = module.model_identity()
    weights = next((tmp_path / "vae").glob("*.safetensors"))
    torch.manual_seed(1)
    tiny_module().vae.save_pretrained(tmp_path / "vae")  # new weights, same path and config
    stat = weights.stat()
    os.utime(weights, (stat.st_atime, stat.st_mtime + 10))
    assert module.model_identity() != before


def test_class_conditional_samples_with_a_stochastic_scheduler_depend_on_their_seed_only():
    torch.manual_seed(0)
    module = DiffusionBase(components=CLASS_UNET, null_class=2, sample_scheduler="DDPMScheduler", sample_steps=3)
    together = module.generate(labels=[0, 1], seeds=[3, 4], guidance_scale=1.0)
    torch.manual_seed(123)
    alone = module.generate(labels=[1], seeds=[4], guidance_scale=1.0)
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def test_predict_of_a_class_conditional_model_samples_the_class_label(tmp_path):
    folder = write_images(tmp_path / "subject", 2, resolution=16)
    module = DiffusionBase(components=CLASS_UNET, null_class=2, sample_steps=2)
    data = LimitedDataModule(str(folder), instance_prompt="x", class_label=1, resolution=16, predict_seeds=[0, 1])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    images = torch.cat(trainer.predict(module, data))  # was: TypeError, no labels reached generate()
    assert images.shape == (2, 3, 16, 16)
    assert torch.allclose(images, module.generate(labels=[1, 1], seeds=[0, 1]), atol=1e-5)
