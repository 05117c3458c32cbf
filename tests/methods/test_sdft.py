"""SelfDistillationFineTuning: the distillation term against the frozen teacher, its window and its variants."""

from __future__ import annotations

import pytest
import torch
from conftest import quiet_trainer, tiny_module, write_images

from lightning_ft.core.base import DiffusionBase
from lightning_ft.data import LimitedDataModule
from lightning_ft.methods.sdft import SelfDistillationFineTuning


def _batch(n: int = 4):
    return {"pixel_values": torch.rand(n, 3, 32, 32) * 2 - 1, "prompts": ["a red star on a gray background"] * n}


def _fix_timesteps(module, monkeypatch, timesteps):
    monkeypatch.setattr(module, "sample_timesteps", lambda n: torch.tensor(timesteps[:n]))


def _perturb_student(module, scale=0.05):
    with torch.no_grad():
        for p in module.denoiser.parameters():
            p.add_(scale * torch.randn_like(p))


def _student_forward(module, timesteps):
    x0 = torch.randn(len(timesteps), 4, 16, 16)
    noisy = module.noise_scheduler.add_noise(x0, torch.randn_like(x0), timesteps)
    condition = module.encode_prompts(["a red star"] * len(timesteps))
    return module.predict(noisy, timesteps, condition), noisy, condition


@pytest.mark.parametrize("target", ["prediction", "lowpass_x0"])
def test_distillation_is_exactly_zero_before_the_first_update(target, monkeypatch):
    torch.manual_seed(0)
    module = tiny_module(SelfDistillationFineTuning, distill_target=target)
    assert module.frozen_denoiser is not None and module.frozen_denoiser is not module.denoiser
    _fix_timesteps(module, monkeypatch, [999, 800, 600, 500])  # all inside the distillation window
    module.train()
    loss, logs = module.training_loss(_batch())
    assert logs["loss/distill"].item() == 0.0
    assert torch.equal(loss.detach(), logs["loss/diffusion"])


def test_distillation_gradient_reaches_only_the_student():
    torch.manual_seed(0)
    module = tiny_module(SelfDistillationFineTuning)
    _perturb_student(module)
    module.train()
    timesteps = torch.tensor([999, 700, 500])
    prediction, noisy, condition = _student_forward(module, timesteps)
    distill = module.distillation_loss(prediction, noisy, timesteps, condition)
    assert (distill > 0).all()
    distill.mean().backward()
    assert not any(p.requires_grad for p in module.frozen_denoiser.parameters())
    assert all(p.grad is None for p in module.frozen_denoiser.parameters())
    grads = [p.grad for p in module.denoiser.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_training_updates_the_student_and_leaves_the_teacher(monkeypatch):
    torch.manual_seed(0)
    module = tiny_module(SelfDistillationFineTuning, lr=1e-3)
    teacher = {n: p.detach().clone() for n, p in module.frozen_denoiser.named_parameters()}
    optimizer = module.configure_optimizers()["optimizer"]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]}.isdisjoint(
        id(p) for p in module.frozen_denoiser.parameters()
    )
    _fix_timesteps(module, monkeypatch, [900, 700, 600, 510])
    module.train()
    for _ in range(2):
        loss, logs = module.training_loss(_batch())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert logs["loss/distill"] > 0  # the student has moved away from the teacher
    assert all(torch.equal(p, teacher[n]) for n, p in module.frozen_denoiser.named_parameters())


def test_prediction_distillation_is_zero_below_tau_T():
    torch.manual_seed(0)
    module = tiny_module(SelfDistillationFineTuning, distill_from=0.5)
    _perturb_student(module)
    timesteps = torch.tensor([0, 250, 499, 500, 750, 999])
    prediction, noisy, condition = _student_forward(module, timesteps)
    distill = module.distillation_loss(prediction, noisy, timesteps, condition)
    assert torch.equal(distill[:3], torch.zeros(3)) and (distill[3:] > 0).all()
    assert torch.equal(module.distill_weights(timesteps), torch.tensor([0.0, 0, 0, 1, 1, 1]))


def test_lowpass_variant_distills_at_every_t_on_pooled_x0():
    torch.manual_seed(0)
    module = tiny_module(SelfDistillationFineTuning, distill_target="lowpass_x0", lowpass_factor=4)
    _perturb_student(module)
    timesteps = torch.tensor([0, 100, 499, 999])
    prediction, noisy, condition = _student_forward(module, timesteps)
    distill = module.distillation_loss(prediction, noisy, timesteps, condition)
    assert torch.isfinite(distill).all() and (distill > 0).all()  # below tau T too

    # Unweighted, the x0 difference of an epsilon model is the epsilon difference times sqrt((1 - abar) / abar).
    module.hparams.lowpass_snr_gamma = None
    unweighted = module.distillation_loss(prediction, noisy, timesteps, condition)
    snr = module.noise_scheduler.alphas_cumprod[timesteps] / (1 - module.noise_scheduler.alphas_cumprod[timesteps])
    assert torch.allclose(distill, unweighted * snr.clamp(max=1.0), rtol=1e-4)
    assert unweighted[-1] > 1e4 * unweighted[0]  # why the default weights it


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_inverts_the_prediction_target(kind):
    torch.manual_seed(0)
    module = tiny_module(SelfDistillationFineTuning, prediction_type=kind)
    x0, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    timesteps = torch.tensor([10, 500, 900])
    noisy = module.noise_scheduler.add_noise(x0, noise, timesteps)
    target = module.prediction_target(x0, noise, timesteps)
    assert torch.allclose(module.predicted_x0(target, noisy, timesteps), x0, atol=1e-3)


def test_diffusion_term_matches_the_base_loss_on_the_same_inputs(monkeypatch):
    torch.manual_seed(0)
    module = tiny_module(SelfDistillationFineTuning, distill_weight=0.7)
    _perturb_student(module)
    module.train()
    batch = _batch(3)
    latents = torch.randn(3, 4, 16, 16)
    noise = torch.randn(3, 4, 16, 16)
    timesteps = torch.tensor([100, 600, 900])
    monkeypatch.setattr(module, "encode_images", lambda pixels, **kwargs: latents)
    monkeypatch.setattr(module, "make_noise", lambda x0: noise)
    _fix_timesteps(module, monkeypatch, timesteps.tolist())
    loss, logs = module.training_loss(batch)
    condition = module.encode_conditions(batch)
    expected = DiffusionBase.diffusion_loss(module, latents, condition, timesteps, noise).mean()
    assert torch.allclose(logs["loss/diffusion"], expected, rtol=1e-5)
    assert torch.allclose(loss, logs["loss/diffusion"] + 0.7 * logs["loss/distill"], rtol=1e-5)


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="distill_target"):
        tiny_module(SelfDistillationFineTuning, distill_target="features")
    with pytest.raises(ValueError, match="distill_from"):
        tiny_module(SelfDistillationFineTuning, distill_from=1.5)


def test_sdft_fits_end_to_end_with_a_trainer(tmp_path):
    torch.manual_seed(0)
    data_dir = write_images(tmp_path / "data", 4, captions=True)
    module = tiny_module(SelfDistillationFineTuning, lr=1e-3, distill_from=0.0)
    teacher = {n: p.detach().clone() for n, p in module.frozen_denoiser.named_parameters()}
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(module, LimitedDataModule(str(data_dir), resolution=32, batch_size=2, repeats=4))
    parts = module.last_loss_parts  # every step's parts (they reach the logger only on its logging steps)
    assert trainer.global_step == 3 and {"loss", "loss/diffusion", "loss/distill"} <= parts.keys()
    assert parts["loss/distill"] > 0  # distill_from=0: every step is distilled, and the student moved
    assert all(torch.equal(p, teacher[n]) for n, p in module.frozen_denoiser.named_parameters())


def test_teacher_runs_only_on_the_distilled_rows_and_the_loss_is_unchanged():
    """The teacher's forward is skipped for samples whose weight is 0 (t < tau T): half the teacher's cost at the
    default tau, and per sample the same value as running it on the whole batch."""
    torch.manual_seed(0)
    module = tiny_module(SelfDistillationFineTuning, distill_from=0.5)
    _perturb_student(module)
    module.train()
    timesteps = torch.tensor([999, 100, 700, 20])
    prediction, noisy, condition = _student_forward(module, timesteps)
    batch_sizes = []
    module.frozen_denoiser.register_forward_hook(lambda m, args, kwargs, out: batch_sizes.append(len(args[0])),
                                                 with_kwargs=True)  # fmt: skip
    distill = module.distillation_loss(prediction, noisy, timesteps, condition)
    assert batch_sizes == [2]  # the rows at t=999 and t=700 only
    with torch.no_grad():
        teacher = module.predict(noisy, timesteps, condition, denoiser=module.frozen_denoiser)
    whole = ((prediction.detach() - teacher) ** 2).mean(dim=(1, 2, 3)) * torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert torch.allclose(distill.detach(), whole, rtol=1e-6, atol=1e-9)
    assert distill[1] == 0 and distill[3] == 0 and (distill[[0, 2]] > 0).all()
    distill.sum().backward()  # the student's graph goes through the rows that were distilled
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.denoiser.parameters())
    batch_sizes.clear()
    assert module.distillation_loss(prediction, noisy, torch.tensor([1, 2, 3, 4]), condition).abs().sum() == 0
    assert batch_sizes == []  # no row in the window: no teacher forward at all
