"""Masked training: the loss mask weights the denoising loss at latent resolution, for every method.

What is checked: the gradient of each method's loss with respect to the denoiser's prediction is exactly zero in
the latent cells a mask zeroes and non-zero elsewhere; prior-preservation class images and Diff-Tuning's memory
images are not masked; SDFT masks its diffusion term but not its distillation term (which keeps the source
model's behaviour everywhere); the loss is kohya's formula (the error times the area-resized mask, mean over the
whole image), OneTrainer's ``unmasked_weight`` and ``normalize_masked_area_loss`` give theirs, an all-ones mask
gives the unmasked loss exactly, and the validation loss is masked too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb, tiny_module

from lightning_ft.methods import (
    AdapterAttentionFineTuning,
    BayesianFineTuning,
    ConditionTuning,
    DiffTuning,
    DreamBooth,
    SelfDistillationFineTuning,
)

SIDE = 32  # the tiny model's images; its VAE halves them: 16x16 latents, each latent cell a 2x2 block of pixels


def _masks(n: int) -> torch.Tensor:
    """(n, 1, 32, 32) masks, a different one per image (so that a mask applied to the wrong image shows): image 0
    is masked out on its left half, image 1 on its top half, image 2 on its bottom-right quarter, ...; every
    boundary falls between latent cells."""
    masks = torch.ones(n, 1, SIDE, SIDE)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            masks[i, :, :, : SIDE // 2] = 0
        elif kind == 1:
            masks[i, :, : SIDE // 2] = 0
        else:
            masks[i, :, SIDE // 2 :, SIDE // 2 :] = 0
    return masks


def _latent_zero(mask: torch.Tensor) -> torch.Tensor:
    """Where a pixel mask (1, 32, 32) is zero on a whole latent cell: (16, 16) booleans."""
    return F.avg_pool2d(mask, 2)[0] == 0


def _batch(n: int, masked: bool = True, prior: int = 0, class_mask: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "pixel_values": torch.rand(n, 3, SIDE, SIDE, generator=g) * 2 - 1,
        "prompts": ["a sks star on a gray background"] * n,
    }
    if masked:
        batch["mask"] = _masks(n)
    if prior:
        batch["class_pixel_values"] = torch.rand(prior, 3, SIDE, SIDE, generator=g) * 2 - 1
        batch["class_prompts"] = ["a star on a gray background"] * prior
        if masked and class_mask:
            batch["class_mask"] = torch.ones(prior, 1, SIDE, SIDE)
    return batch


def _prediction_gradients(module, batch: dict) -> torch.Tensor:
    """The gradient of ``module.training_loss(batch)`` with respect to the trained denoiser's prediction (not a
    frozen teacher's), rows in the order of the denoiser's batch."""
    grads, original = [], module.predict

    def predict(noisy, timesteps, condition, denoiser=None):
        out = original(noisy, timesteps, condition, denoiser)
        if denoiser is None and out.requires_grad:
            out.register_hook(lambda grad: grads.append(grad.detach().clone()))
        return out

    module.predict = predict
    try:
        module.train()
        loss, _ = module.training_loss(batch)
        loss.backward()
    finally:
        del module.predict
    assert len(grads) == 1, "one forward of the trained denoiser per step"
    return grads[0]


def _assert_masked(grad: torch.Tensor, masks: torch.Tensor) -> None:
    """Rows of ``grad`` (B, C, 16, 16): exactly zero where their mask zeroes a latent cell, non-zero elsewhere."""
    for row, mask in zip(grad, masks):
        zero = _latent_zero(mask)
        assert zero.any() and (~zero).any()
        assert torch.count_nonzero(row[:, zero]) == 0, "a masked-out latent cell receives gradient"
        assert torch.all(row[:, ~zero] != 0), "a latent cell to train on receives no gradient"


def _assert_unmasked(grad: torch.Tensor) -> None:
    assert torch.all(grad != 0), "an unmasked image has latent cells without gradient"


def _module(cls=DreamBooth, **kwargs):
    torch.manual_seed(0)
    module = tiny_module(cls, **kwargs)
    perturb(module)  # off the initialisation (zero-initialised adapters, a student equal to its teacher)
    return module


# ---------------------------------------------------------------------------------------- masked gradients
@pytest.mark.parametrize("cls", [DreamBooth, BayesianFineTuning, AdapterAttentionFineTuning, ConditionTuning])
def test_masked_out_latent_cells_receive_no_gradient(cls):
    module = _module(cls)
    batch = _batch(3)
    _assert_masked(_prediction_gradients(module, batch), batch["mask"])
    # Without masks in the batch, every cell trains.
    _assert_unmasked(_prediction_gradients(module, _batch(3, masked=False)))


@pytest.mark.parametrize("cls", [DreamBooth, BayesianFineTuning])
@pytest.mark.parametrize("class_mask", [True, False])
def test_prior_preservation_images_are_not_masked(cls, class_mask):
    """The instance half follows its masks; the class half trains everywhere, with the data module's ones
    ``class_mask`` or without any (a missing class mask is ones)."""
    module = _module(cls)
    batch = _batch(2, prior=2, class_mask=class_mask)
    grad = _prediction_gradients(module, batch)
    assert len(grad) == 4
    _assert_masked(grad[:2], batch["mask"])
    _assert_unmasked(grad[2:])


def test_diff_tuning_masks_target_rows_and_not_its_memory_rows(tmp_path):
    module = _module(DiffTuning, memory_ratio=0.5, memory_size=4, memory_cache_dir=str(tmp_path))
    # A bank of random images in place of the pretrained model's samples (what is checked is the split).
    module.memory_bank = torch.randint(0, 256, (4, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator())
    batch = _batch(4)
    grad = _prediction_gradients(module, batch)
    assert module.memory_count(4) == 2 and len(grad) == 4
    _assert_masked(grad[:2], batch["mask"][:2])  # the target rows, with their own masks
    _assert_unmasked(grad[2:])  # the memory rows (replacing the batch's last two images)


def test_diff_tuning_without_memory_masks_every_row(tmp_path):
    module = _module(DiffTuning, memory_ratio=0.0, memory_cache_dir=str(tmp_path))
    batch = _batch(3)
    _assert_masked(_prediction_gradients(module, batch), batch["mask"])


def test_sdft_masks_its_diffusion_term_and_not_its_distillation_term():
    # Without distillation: the diffusion term alone, masked.
    module = _module(SelfDistillationFineTuning, distill_weight=0.0)
    batch = _batch(3)
    _assert_masked(_prediction_gradients(module, batch), batch["mask"])
    # With distillation at every timestep (tau = 0) the masked-out cells still train: towards the frozen source
    # model, which keeps its general behaviour everywhere in the image (by design, docs/usage.md "Masked loss").
    module = _module(SelfDistillationFineTuning, distill_weight=1.0, distill_from=0.0)
    _assert_unmasked(_prediction_gradients(module, batch))


def test_sdft_gradient_in_masked_cells_is_the_distillation_term_alone(monkeypatch):
    """In a masked-out cell the gradient is exactly the distillation term's, 2 (student - teacher) / numel times
    its weights; elsewhere the diffusion term adds to it."""
    module = _module(SelfDistillationFineTuning, distill_weight=0.5, distill_from=0.0)
    batch = _batch(2)
    timesteps = torch.tensor([700, 300])
    monkeypatch.setattr(module, "sample_timesteps", lambda n: timesteps[:n])
    seen = {}
    original = module.distillation_loss

    def distillation_loss(prediction, noisy, t, condition):
        with torch.inference_mode():
            teacher = module.predict(noisy, t, condition, denoiser=module.frozen_denoiser)
        seen["difference"] = (prediction.detach() - teacher.clone()).float()
        return original(prediction, noisy, t, condition)

    monkeypatch.setattr(module, "distillation_loss", distillation_loss)
    grad = _prediction_gradients(module, batch)
    numel = grad[0].numel()
    # d/d student of mean_b 0.5 * mean ||student - teacher||^2 = 0.5 * 2 (student - teacher) / numel / B
    expected = 0.5 * 2 * seen["difference"] / numel / len(grad)
    for row, want, mask in zip(grad, expected, batch["mask"]):
        zero = _latent_zero(mask)
        assert torch.allclose(row[:, zero], want[:, zero], rtol=1e-5, atol=1e-12)
        assert not torch.allclose(row[:, ~zero], want[:, ~zero], rtol=1e-3, atol=0)  # plus the diffusion term


# ------------------------------------------------------------------------------------------- loss formulas
def _fixed_inputs(module, batch: dict, monkeypatch, timesteps=(50, 400, 900)):
    """Fix the latents, timesteps and noise that ``training_loss`` draws; returns them."""
    torch.manual_seed(1)
    x0 = module.encode_images(batch["pixel_values"]).detach()
    noise = torch.randn_like(x0)
    t = torch.tensor(timesteps[: len(x0)])
    monkeypatch.setattr(module, "encode_images", lambda pixels, generator=None, keys=None: x0)
    monkeypatch.setattr(module, "sample_timesteps", lambda n: t)
    monkeypatch.setattr(module, "make_noise", lambda like: noise)
    return x0, noise, t


def _squared_error(module, batch: dict, x0, noise, t) -> torch.Tensor:
    """(pred - eps)^2 per element, by diffusers' own forward process (the tiny model predicts epsilon)."""
    noisy = module.noise_scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        pred = module.predict(noisy, t, module.encode_conditions(batch))
    return (pred.float() - noise.float()) ** 2


def _soft_masks(n: int) -> torch.Tensor:
    masks = torch.rand(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    masks[0, :, :, :12] = 0  # a hard edge through latent cells, and a soft rest
    return masks


def test_the_loss_is_kohyas_masked_loss(monkeypatch):
    """kohya sd-scripts' apply_masked_loss: the error times the mask resized to the latents by area averaging (here
    2x2 average pooling), then the mean over every element of the image, not over the mask's area."""
    module = _module()
    batch = {**_batch(3, masked=False), "mask": _soft_masks(3)}
    x0, noise, t = _fixed_inputs(module, batch, monkeypatch)
    error = _squared_error(module, batch, x0, noise, t)
    weights = F.avg_pool2d(batch["mask"], 2)
    expected = (error * weights).mean(dim=(1, 2, 3)).mean()
    loss, logs = module.training_loss(batch)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    unmasked = error.mean(dim=(1, 2, 3)).mean()
    assert loss < 0.8 * unmasked  # the masks' mean is about 0.45: the masked loss is not renormalised by area


def test_unmasked_weight_and_area_normalisation_give_onetrainers_formulas(monkeypatch):
    batch = {**_batch(3, masked=False), "mask": _soft_masks(3)}
    cell = F.avg_pool2d(batch["mask"], 2)
    for w, normalize in ((0.25, False), (0.0, True), (0.25, True)):
        module = _module(unmasked_weight=w, masked_loss_normalize=normalize)
        with monkeypatch.context() as patch:
            x0, noise, t = _fixed_inputs(module, batch, patch)
            error = _squared_error(module, batch, x0, noise, t)
            weights = w + (1 - w) * cell
            per_sample = (error * weights).mean(dim=(1, 2, 3))
            if normalize:
                per_sample = per_sample / weights.mean(dim=(1, 2, 3))
            loss, _ = module.training_loss(batch)
        assert torch.allclose(loss, per_sample.mean(), rtol=1e-6, atol=0), (w, normalize)


def test_an_all_ones_mask_gives_exactly_the_unmasked_loss(monkeypatch):
    module = _module(masked_loss_normalize=True)
    batch = _batch(3, masked=False)
    _fixed_inputs(module, batch, monkeypatch)
    unmasked, _ = module.training_loss(batch)
    ones, _ = module.training_loss({**batch, "mask": torch.ones(3, 1, SIDE, SIDE)})
    assert torch.equal(ones, unmasked)


def test_normalised_all_zero_mask_adds_nothing_instead_of_nan(monkeypatch):
    module = _module(masked_loss_normalize=True)
    batch = _batch(2, masked=False)
    x0, noise, t = _fixed_inputs(module, batch, monkeypatch)
    mask = torch.ones(2, 1, SIDE, SIDE)
    mask[1] = 0
    loss, _ = module.training_loss({**batch, "mask": mask})
    with torch.no_grad():
        per_sample = module.diffusion_loss(x0, module.encode_conditions(batch), t, noise)
    assert torch.isfinite(loss) and torch.allclose(loss, per_sample[0] / 2, rtol=1e-6, atol=0)


def test_the_validation_loss_is_masked():
    module = _module()
    module.eval()
    batch = _batch(2, masked=False)
    plain = module.evaluation_loss(batch, 0)
    assert torch.equal(module.evaluation_loss({**batch, "mask": torch.ones(2, 1, SIDE, SIDE)}, 0), plain)
    assert module.evaluation_loss({**batch, "mask": torch.zeros(2, 1, SIDE, SIDE)}, 0) == 0
    half = module.evaluation_loss({**batch, "mask": _masks(2)}, 0)
    assert 0 < half < plain


def test_a_video_error_takes_the_mask_on_every_frame():
    module = _module(unmasked_weight=0.1)
    pred, target = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 4, 3, 8, 8)  # (B, C, T, h, w)
    mask = torch.rand(2, 1, 16, 16)
    weights = 0.1 + 0.9 * F.avg_pool2d(mask, 2)[:, :, None]
    expected = ((pred - target) ** 2 * weights).mean(dim=(1, 2, 3, 4))
    assert torch.allclose(module.per_sample_error(pred, target, mask), expected, rtol=1e-6)


# -------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_unmasked_weight_outside_0_1_is_refused_by_key(value):
    with pytest.raises(ValueError, match=r"model\.unmasked_weight="):
        tiny_module(unmasked_weight=value)


def test_masked_loss_normalize_must_be_a_bool():
    with pytest.raises(ValueError, match=r"model\.masked_loss_normalize='yes': must be true or false"):
        tiny_module(masked_loss_normalize="yes")


def test_a_mask_that_does_not_fit_its_images_names_both_shapes():
    module = _module()
    batch = {**_batch(2, masked=False), "mask": torch.ones(2, 1, 16, 16)}
    with pytest.raises(ValueError, match=r"batch\['mask'\] has shape \(2, 1, 16, 16\).*\(2, 1, 32, 32\)"):
        module.training_loss(batch)
