"""Checks and builders shared by the family tests (``tests/families/test_<family>.py``).

Each family's test keeps what is its own (its reference script's steps, its pipeline's call, its expected layers and
tolerances) and passes it in; what is the same for every family lives here: the DreamBooth batch with its noise and
draws, the loss lines the diffusers DreamBooth scripts share, a training loss on fixed draws, the export and LoRA-only
export round trips, refusals by pipeline name and the layers BNN selects. Plain functions, imported by name."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from lightning_ft.methods import DreamBooth


def pipe_sample(module, pipe, prompts: Sequence[str], seeds: Sequence[int], guidance: float, steps: int = 2):
    """The family's pipeline call (what ``generate`` makes) on another pipeline, e.g. an export reloaded by
    diffusers: ``prompts`` sampled with generators seeded ``seeds``, ``steps`` steps, guidance ``guidance``."""
    pipe.set_progress_bar_config(disable=True)
    return module.family.sample(module, pipe, module.family.sample_inputs(prompts=prompts), seeds, steps, guidance)


def sources(n: int = 2, side: int = 32, seed: int = 3) -> torch.Tensor:
    """Source images in [0, 1] (n, 3, side, side) for an editing model, the same ones for the same seed."""
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def dreambooth_batch(prompts, class_prompts, latent_shape: tuple[int, ...], prior: bool, seed: int = 1):
    """A DreamBooth batch of 32 px images, its noise of model-space shape ``latent_shape`` (C, H, W) per image and
    the script's u (its density draw): 4 instance images with their own prompts (``prompts`` then
    ``class_prompts``, the script's default batch size), or, with ``prior``, one instance and one class image (the
    prior-preservation batch the scripts can run). Returns ``batch, pixels, prompts, noise, u`` (pixels and prompts
    in the script's order: instance, then class)."""
    generator = torch.Generator().manual_seed(seed)
    if prior:
        batch = {"pixel_values": torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1,
                 "class_pixel_values": torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1,
                 "prompts": list(prompts[:1]), "class_prompts": list(class_prompts[:1])}  # fmt: skip
        pixels = torch.cat([batch["pixel_values"], batch["class_pixel_values"]])
        prompts = list(prompts[:1]) + list(class_prompts[:1])
        u = torch.tensor([0.12, 0.83])
    else:
        prompts = list(prompts) + list(class_prompts)
        batch = {"pixel_values": torch.rand(4, 3, 32, 32, generator=generator) * 2 - 1, "prompts": prompts}
        pixels, u = batch["pixel_values"], torch.tensor([0.03, 0.41, 0.68, 0.97])
    noise = torch.randn(len(pixels), *latent_shape, generator=generator)
    return batch, pixels, prompts, noise, u


def script_mse(model_pred, target, weighting, prior: bool, chunk_weighting: bool) -> torch.Tensor:
    """The loss lines of diffusers' flow-matching DreamBooth scripts: per image the mean of weighting * (pred -
    target)^2, averaged; with ``prior`` the batch's second half (class images) is the prior loss, added at weight 1
    (``--prior_loss_weight`` 1.0). ``chunk_weighting``: the weighting is chunked with them (the Flux.1, Flux.1
    Kontext, Qwen-Image, Krea 2 and Ideogram 4 scripts); the Z-Image, Lumina 2 and HiDream scripts chunk only the
    predictions and targets, and their whole-batch weighting (ones) broadcasts with one image per half."""
    prior_loss = 0.0
    if prior:
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        weighting_prior = weighting
        if chunk_weighting:
            weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)
        prior_loss = torch.mean(
            (weighting_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2).reshape(
                target_prior.shape[0], -1
            ),
            1,
        ).mean()
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean() + 1.0 * prior_loss


def script_draw(scheduler, u, mu: float | None = None):
    """The flow DreamBooth scripts' noise levels for their density draw ``u``: the table's timesteps at ``(u *
    num_train_timesteps).long()`` and their sigmas (``get_sigmas``: each timestep looked up in the table), (B, 1, 1,
    1). ``mu``: the sigmas shifted as the pipeline's dynamic scheduler samples (``time_shift``; the scripts do not),
    and the timesteps 1000 sigma. Returns ``timesteps, sigmas``."""
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    if mu is not None:
        sigmas = scheduler.time_shift(mu, 1.0, sigmas)
        timesteps = sigmas.flatten() * 1000
    return timesteps, sigmas


@contextlib.contextmanager
def last_denoiser_call(module):
    """Within the block: the keyword arguments of the denoiser's last call, and its output (``out``)."""
    seen = {}

    def keep(layer, args, kwargs, output):
        seen.update(kwargs, out=output[0])

    hook = module.denoiser.register_forward_hook(keep, with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


def fixed_draws_loss(module, batch, t, noise, seed: int | None = None) -> torch.Tensor:
    """``DreamBooth.training_loss`` with the timesteps ``t`` and ``noise`` fixed (where the base draws them), without
    gradients; ``seed``: the global generator seeded first, for a VAE posterior draw made as the script makes it."""
    module.sample_timesteps = lambda n: t
    module.make_noise = lambda x0: noise
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        loss, _ = module.training_loss(batch)
    return loss


def check_loss_at_both_shifts(module, script_loss, calculate_shift, flow_shift, monkeypatch, prompts,
                              u_seed: int = 9) -> None:  # fmt: skip
    """The scripts that train on their unshifted table (Qwen-Image, Krea 2: ``use_dynamic_shifting`` schedulers)
    against a (LoRA) module built with ``flow_shift``: a prior-preservation batch of two instance and two class
    images, the module's own timestep draw from u of a generator seeded ``u_seed`` (``script_loss(module, batch,
    noise, u_seed, mu=None)`` draws its u alike) and the posterior draw seeded 1234 in both. ``flow_shift=1.0``
    gives the script's loss, the default (None) the script's steps at the shift the pipeline samples 32 px images
    with (``mu`` of the pipeline's ``calculate_shift`` over the 16 image tokens); the two differ."""
    module.train()
    generator = torch.Generator().manual_seed(5)
    batch = {"pixel_values": torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1, "prompts": list(prompts),
             "class_pixel_values": torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1,
             "class_prompts": ["a star", "a star"]}  # fmt: skip
    noise = torch.randn(4, 4, 8, 8, generator=generator)
    monkeypatch.setattr(module, "make_noise", lambda x0: noise)

    def timesteps(n):  # the framework's own draw, from u of the generator script_loss seeds alike
        return module.noise_process.sample_timesteps(n, generator=torch.Generator().manual_seed(u_seed))

    monkeypatch.setattr(module, "sample_timesteps", timesteps)
    torch.manual_seed(1234)  # the posterior draw, as in script_loss
    loss, _ = module.training_loss(batch)
    with torch.no_grad():
        script = script_loss(module, batch, noise, u_seed).item()
        config = module.noise_scheduler.config
        mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)  # fmt: skip
        shifted = script_loss(module, batch, noise, u_seed, mu=mu).item()
    assert abs(script - shifted) > 1e-4  # the two tables differ enough to tell apart
    expected = script if flow_shift == 1.0 else shifted  # default: where the pipeline samples
    assert loss.item() == pytest.approx(expected, abs=1e-6, rel=0)
    assert module.noise_process.dynamic == (flow_shift is None)


def check_edit_loss_at_both_shifts(make, script_loss, prompts, latent_shape: tuple[int, ...]) -> None:
    """An editing model's loss against its script's (``script_loss(module, batch, x0, noise, indices)``, no prior
    preservation) on two images with sources: ``make(flow_shift=..., trainable="lora", lora_rank=2)`` built and
    perturbed after ``torch.manual_seed(0)``; ``flow_shift=1.0`` (the script's unshifted table) gives the script's
    loss on the same target latents (``latent_shape`` (C, H, W)), noise and schedule positions, the default another
    one; and the whole training step, given its own posterior draw of the target latents, is the script's too."""
    from conftest import perturb

    generator = torch.Generator().manual_seed(5)
    batch = {"pixel_values": torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1, "prompts": list(prompts),
             "source_values": sources()}  # fmt: skip
    x0 = torch.randn(2, *latent_shape, generator=generator)
    noise = torch.randn(2, *latent_shape, generator=generator)
    index = torch.tensor([100, 700])
    losses, modules = {}, {}
    for shift in (1.0, None):
        torch.manual_seed(0)
        module = make(flow_shift=shift, trainable="lora", lora_rank=2)
        perturb(module)
        module.train()
        t = module.noise_process.num_train_timesteps - 1 - index  # schedule position -> lightning-ft's timestep
        losses[shift] = module.diffusion_loss(x0, module.encode_conditions(batch), t, noise).mean()
        assert module.noise_process.dynamic == (shift is None)
        modules[shift] = module
    module = modules[1.0]
    with torch.no_grad():
        script = script_loss(module, batch, x0, noise, index)
    torch.testing.assert_close(losses[1.0].detach(), script, rtol=1e-6, atol=1e-6)
    assert abs(losses[None].item() - script.item()) > 1e-4  # the default is another objective, on purpose
    # The whole training step: the target latents are the framework's posterior draw; given them, the loss is the
    # script's.
    drawn = {}
    encode = module.encode_images

    def spy(*args, **kwargs):
        out = encode(*args, **kwargs)
        if kwargs.get("sample", True):
            drawn["x0"] = out
        return out

    module.encode_images = spy
    module.make_noise = lambda x: noise
    module.sample_timesteps = lambda n: module.noise_process.num_train_timesteps - 1 - index
    loss, _ = module.training_loss(batch)
    with torch.no_grad():
        assert loss.item() == pytest.approx(script_loss(module, batch, drawn["x0"], noise, index).item(), abs=1e-6)


def export_and_load(module, folder: Path, class_name: str, prompts, seeds=(3, 4), guidance: float = 2.5):
    """The module's images (two different ones), its full export in ``folder`` loaded by plain diffusers as a
    ``class_name``, and the family's call on that pipeline checked to sample the same images (atol 1e-5). Returns
    the images and the pipeline, for the family's own checks of a plain call."""
    expected = module.generate(prompts=prompts, seeds=list(seeds), guidance_scale=guidance)
    assert not torch.allclose(expected[0], expected[1])
    module.save_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == class_name
    torch.testing.assert_close(pipe_sample(module, pipe, prompts, seeds, guidance), expected, rtol=0, atol=1e-5)
    return expected, pipe


def check_loads_back(folder: Path, name: str, expected, generate: dict, **kwargs) -> DreamBooth:
    """lightning-ft loads the export in ``folder`` back as family ``name`` (``kwargs``: the module's settings), and
    it samples ``expected`` from the same ``generate`` arguments (atol 1e-5). Returns the module."""
    reloaded = DreamBooth(pretrained=str(folder), sample_steps=2, **kwargs)
    assert reloaded.family.name == name
    torch.testing.assert_close(reloaded.generate(**generate), expected, rtol=0, atol=1e-5)
    return reloaded


def saved_and_loaded(module, folder: Path):
    """``module``'s full export in ``folder``, loaded by plain diffusers."""
    module.save_pretrained(folder)
    return DiffusionPipeline.from_pretrained(folder)


def check_lora_only_export(
    module,
    folder: Path,
    base: Callable,
    prompts,
    seeds=(0, 1),
    guidance: float = 2.0,
    sample: Callable | None = None,
    differs: float = 1e-3,
    **inputs,
) -> torch.Tensor:
    """A LoRA-trained ``module``'s LoRA-only export (``folder / "lora"``), loaded with the pipeline's
    ``load_lora_weights`` on the base, samples the images ``module.generate`` makes of ``prompts`` (and ``inputs``,
    e.g. sources) with ``seeds`` and ``guidance`` (atol 1e-5), and the base alone does not (by more than
    ``differs``): the LoRA is what makes them equal. ``base()``, called after ``torch.manual_seed(0)`` as the
    module's base was built: a module of the same random base weights (its full export in ``folder / "base"`` is
    loaded by plain diffusers) or a plain pipeline of them. ``sample(pipe)``: the pipeline's images (default: the
    family's call, ``pipe_sample``). Returns the module's images."""
    seeds = list(seeds)
    expected = module.generate(prompts=prompts, seeds=seeds, guidance_scale=guidance, **inputs)
    module.save_pretrained(folder / "lora", lora_only=True)
    torch.manual_seed(0)
    pipe = base()
    if not isinstance(pipe, DiffusionPipeline):
        pipe = saved_and_loaded(pipe, folder / "base")
    sample = sample or (lambda pipe: pipe_sample(module, pipe, prompts, seeds, guidance))
    before = sample(pipe)
    pipe.load_lora_weights(folder / "lora")
    torch.testing.assert_close(sample(pipe), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(before, expected, atol=differs)  # the LoRA is what made them equal
    return expected


def lora_targets(module) -> set[str]:
    """The ``target_modules`` of the module's (single) LoRA adapter."""
    return set(next(iter(module.denoiser.peft_config.values())).target_modules)


def check_refused_by_name(folder: Path, class_name: str, match: str | None = None, **kwargs) -> None:
    """The export in ``folder``, its ``model_index.json`` naming ``class_name`` instead, is refused on load with a
    NotImplementedError naming it (``match``: a pattern the message must match instead; ``kwargs``: the module's
    settings)."""
    index_file = Path(folder) / "model_index.json"
    index_file.write_text(json.dumps({**json.loads(index_file.read_text()), "_class_name": class_name}))
    with pytest.raises(NotImplementedError, match=match or class_name):
        DreamBooth(pretrained=str(folder), **kwargs)


def bnn_chosen(module) -> list[str]:
    """The denoiser's linear layers the family's BNN include / exclude patterns select."""
    from lightning_ft.nn.bayesian import _matches

    family = module.family
    linears = [n for n, m in module.denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
    return [n for n in linears if _matches(n, family.bnn_include) and not _matches(n, family.bnn_exclude)]


def leaf_names(module) -> set[str]:
    """The last components of the denoiser's module names (where a family's ``attention_names`` must be)."""
    return {n.rsplit(".", 1)[-1] for n, _ in module.denoiser.named_modules()}


def record_calls(monkeypatch, pipeline_class) -> list[dict]:
    """The keyword arguments of every ``pipeline_class.__call__`` from now on (the call still runs)."""
    calls = []
    call = pipeline_class.__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", spy)
    return calls
