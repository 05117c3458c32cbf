"""A plain PyTorch DreamBooth training loop: the same math as ``lightning_ft.methods.DreamBooth`` written out by hand
with diffusers and torch calls, as diffusers' ``train_dreambooth.py`` does. It is the reference that
``benchmarks/overhead.py`` times the framework against; ``tests/benchmarks/test_plain_loop.py`` checks that its loss
and its update equal the module's for the same batch and random state.

Random numbers are drawn in the module's order (VAE latent, timesteps, noise), so both give the same loss.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler

#: Lightning precisions the plain loop reproduces: none, autocast to bf16, autocast to fp16 with a GradScaler (what
#: Lightning's mixed-precision plugins and ``accelerate --mixed_precision`` do).
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


class PlainDreamBooth:
    """A copy of ``module``'s denoiser trained by a hand-written loop over ``batches`` (any iterable of the
    data module's batches), with the module's frozen VAE and text encoder, noise schedule and AdamW settings
    (``copy_denoiser=False``: train the module's denoiser itself), at ``precision`` (one of ``PRECISIONS``)."""

    def __init__(self, module, batches, total_steps: int = 1, copy_denoiser: bool = True, precision: str = "32-true"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: the plain loop runs {PRECISIONS}")
        self.precision = precision
        h = module.hparams
        self.device = module.device
        self.unet = (copy.deepcopy(module.denoiser) if copy_denoiser else module.denoiser).train()
        self.vae, self.text_encoder, self.tokenizer = module.vae, module.text_encoder, module.tokenizer
        self.scheduler = module.noise_scheduler
        self.prior_loss_weight = h.prior_loss_weight
        params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay,
                                           eps=h.adam_eps)  # fmt: skip
        self.lr_schedule = get_scheduler(h.lr_scheduler, self.optimizer, num_warmup_steps=h.warmup_steps,
                                         num_training_steps=total_steps)  # fmt: skip
        self.loader, self.epoch = batches, 0
        self.batches = iter(batches)

    def next_batch(self) -> dict:
        """The next batch; a new epoch (with its own shuffle, when the sampler has ``set_epoch``) when one ends."""
        try:
            return next(self.batches)
        except StopIteration:
            self.epoch += 1
            sampler = getattr(self.loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            return next(self.batches)

    def loss(self, batch: dict) -> torch.Tensor:
        pixels, prompts = batch["pixel_values"].to(self.device), list(batch["prompts"])
        n = len(pixels)
        if "class_pixel_values" in batch:
            pixels = torch.cat([pixels, batch["class_pixel_values"].to(self.device)])
            prompts += list(batch["class_prompts"])
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample()
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            # Contiguous as in DiffusionBase.encode_images: randn_like follows the strides of the VAE's
            # channels-last output, so the same seed would otherwise draw other noise.
            latents = ((latents - shift) * self.vae.config.scaling_factor).contiguous()
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)  # fmt: skip
            context = self.text_encoder(ids)[0]
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        noise = torch.randn_like(latents)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if len(per_sample) == n:
            return per_sample.mean()
        return per_sample[:n].mean() + self.prior_loss_weight * per_sample[n:].mean()

    def autocast(self):
        if self.precision == "32-true":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def step(self) -> torch.Tensor:
        with self.autocast():
            loss = self.loss(self.next_batch())
        if self.precision == "16-mixed":
            if not hasattr(self, "scaler"):
                self.scaler = torch.amp.GradScaler(self.device.type)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# ------------------------------------------------------------------------------------------- as a standalone script
def folder_batches(instance_dir, class_dir, instance_prompt, class_prompt, resolution, batch_size, seed=0):
    """Batches of the instance images paired with class images, as diffusers' ``train_dreambooth.py`` builds them:
    PIL images resized and centre-cropped, in [-1, 1], shuffled each epoch. Written out rather than taken from
    ``lightning_ft.data.folder``: importing that package imports Lightning, whose import the start-up benchmark
    measures separately (the same resize and centre crop, so the same pixels)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    def load(folder):
        images = []
        for file in sorted(Path(folder).iterdir()):
            if file.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                image = Image.open(file).convert("RGB")
                scale = resolution / min(image.size)
                image = image.resize((max(resolution, round(image.width * scale)),
                                      max(resolution, round(image.height * scale))), Image.BILINEAR)  # fmt: skip
                left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
                array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
                images.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0)
        return images

    instances, classes = load(instance_dir), load(class_dir)
    count = max(len(instances), len(classes))
    items = [(instances[i % len(instances)], classes[i % len(classes)]) for i in range(count)]
    loader = torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))  # fmt: skip

    class Epochs:  # iterable again at each epoch, like a DataLoader
        def __iter__(self):
            for pixels, class_pixels in loader:
                n = len(pixels)
                yield {"pixel_values": pixels, "prompts": [instance_prompt] * n,
                       "class_pixel_values": class_pixels, "class_prompts": [class_prompt] * n}  # fmt: skip

    return Epochs()


def main(argv=None) -> None:
    """A plain DreamBooth training script (torch, diffusers and transformers only): load the components of a
    diffusers folder, train ``--steps`` steps on folders of instance and class images, and print a JSON line with the
    wall-clock time (``time.time()``) at which its first step ended: the start-up reference of
    ``benchmarks/startup.py``."""
    import argparse
    import json
    import time
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    for name in ("--pretrained", "--instance-dir", "--class-dir", "--instance-prompt", "--class-prompt"):
        parser.add_argument(name, required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    folder = args.pretrained
    model = SimpleNamespace(
        device=torch.device(args.device),
        denoiser=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae").requires_grad_(False),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").requires_grad_(False),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        hparams=SimpleNamespace(
            lr=args.lr,
            betas=(0.9, 0.999),
            weight_decay=1e-2,
            adam_eps=1e-8,
            lr_scheduler="constant",
            warmup_steps=0,
            prior_loss_weight=1.0,
        ),  # fmt: skip
    )
    batches = folder_batches(args.instance_dir, args.class_dir, args.instance_prompt, args.class_prompt,
                             args.resolution, args.batch_size)  # fmt: skip
    for part in (model.denoiser, model.vae, model.text_encoder):
        part.to(model.device)
    loop = PlainDreamBooth(model, batches, args.steps, copy_denoiser=False)
    first = None
    for _ in range(args.steps):
        loop.step()
        first = first or time.time()
    print(json.dumps({"first_step_end": first}), flush=True)


if __name__ == "__main__":
    main()
