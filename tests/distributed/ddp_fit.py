"""Fit the tiny model for a few steps with N CPU processes (DDP, gloo) or one, then save the trained weights.

Run as a script (Lightning's DDP launcher re-executes this file once per extra rank; inside pytest it would re-run
the pytest session instead): ``python tests/distributed/ddp_fit.py DEVICES IMAGES_DIR OUT.pt [CLASS_IMAGES]``.
With CLASS_IMAGES, that many prior-preservation images are sampled first (into a cache beside OUT.pt) and each rank
records how many it sampled, in ``OUT.pt.rank<r>``.

The global batch is the whole 4-image set at every step, split 2 + 2 across ranks under DDP. Noise and timesteps are
drawn from each image's content instead of the process's random stream, so that a sample gets the same noise
whichever rank holds it: then 2 processes and 1 process do the same arithmetic, up to the order of the gradient sum.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import yaml

from lightning_ft.data import LimitedDataModule
from lightning_ft.methods import DreamBooth

REPO = Path(__file__).resolve().parents[2]


def _image_seed(image: torch.Tensor) -> int:
    return int((image.double().abs().sum() * 1000).item()) % (2**31)


class ContentSeededDreamBooth(DreamBooth):
    """DreamBooth whose per-sample noise and timestep depend on the sample's pixels only (test device)."""

    def training_loss(self, batch):
        pixels = batch["pixel_values"]
        seeds = [_image_seed(im) for im in pixels]
        x0 = torch.cat(
            [self.encode_images(pixels[i : i + 1], torch.Generator().manual_seed(s)) for i, s in enumerate(seeds)]
        )
        gens = [torch.Generator().manual_seed(s + 1) for s in seeds]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0)
        t = torch.tensor([int(torch.randint(0, 1000, (1,), generator=g)) for g in gens], device=x0.device)
        loss = self.diffusion_loss(x0, self.encode_conditions(batch), timesteps=t, noise=noise).mean()
        return loss, {}


def main(devices: int, images: str, out: str, class_images: int = 0) -> None:
    L.seed_everything(0)
    components = yaml.safe_load((REPO / "configs/model/tiny_t2i.yaml").read_text())["model"]["init_args"]["components"]
    module = ContentSeededDreamBooth(components=components, lr=1e-3, sample_steps=2)
    data = LimitedDataModule(images, instance_prompt="a sks star", resolution=32, batch_size=4 // devices, repeats=1,
                             class_prompt="a red star", num_class_images=class_images,
                             class_cache_dir=str(Path(out).parent / f"class_cache_{devices}"))  # fmt: skip
    sample = module.generate

    def counting_generate(*args, **kwargs):
        images = sample(*args, **kwargs)
        Path(f"{out}.rank{module.global_rank}").write_text(str(len(images)))
        return images

    module.generate = counting_generate
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(Path(out).parent),
    )  # fmt: skip
    initial = {k: v.detach().clone() for k, v in module.denoiser.state_dict().items()}
    trainer.fit(module, data)
    if trainer.is_global_zero:
        state = {k: v.detach().clone() for k, v in module.denoiser.state_dict().items()}
        torch.save({"state": state, "initial": initial, "world_size": trainer.world_size,
                    "steps": trainer.global_step}, out)  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0)
