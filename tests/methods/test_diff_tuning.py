"""DiffTuning: the timestep distributions, the cached memory bank, the target/memory split of each batch."""

from __future__ import annotations

import pytest
import torch
from conftest import quiet_trainer, tiny_module, write_images

from lightning_ft.data import LimitedDataModule
from lightning_ft.methods.diff_tuning import DiffTuning, power_law_pmf, power_law_timesteps

T = 1000
BINS = 20  # draws are counted in 20 bins of 50 timesteps, so every expected count is large


def _chi_square(draws: torch.Tensor, pmf: torch.Tensor) -> float:
    counts = torch.bincount(draws, minlength=T).double().view(BINS, -1).sum(1)
    expected = pmf.view(BINS, -1).sum(1) * len(draws)
    return float(((counts - expected) ** 2 / expected).sum())


# df + 6 sqrt(2 df): far beyond the 1e-6 quantile of chi2(df), yet a wrong distribution lands orders above it.
CRITICAL = (BINS - 1) + 6 * (2 * (BINS - 1)) ** 0.5


def _module(tmp_path, **kwargs):
    kwargs = {"memory_size": 4, "memory_sample_steps": 2, "memory_cache_dir": str(tmp_path / "bank"), **kwargs}
    return tiny_module(DiffTuning, **kwargs)


def _batch(n: int):
    return {"pixel_values": torch.rand(n, 3, 32, 32) * 2 - 1, "prompts": [f"a red star {i}" for i in range(n)]}


@pytest.mark.parametrize("power, decreasing", [(1.0, False), (1.0, True), (2.5, True), (0.5, False), (0.0, True)])
def test_power_law_timesteps_follow_the_exact_pmf(power, decreasing):
    pmf = power_law_pmf(T, power, decreasing)
    t = torch.arange(T, dtype=torch.float64)
    expected = (T - t) ** power if decreasing else (t + 1) ** power
    assert torch.allclose(pmf, expected / expected.sum(), rtol=1e-10, atol=0)
    draws = power_law_timesteps(200_000, T, power, decreasing, generator=torch.Generator().manual_seed(0))
    assert draws.dtype == torch.long and 0 <= draws.min() and draws.max() < T
    assert _chi_square(draws, pmf) < CRITICAL
    if power:  # the test has power: the same draws are far from the mirrored distribution
        assert _chi_square(draws, power_law_pmf(T, power, not decreasing)) > 100 * CRITICAL


def test_power_zero_is_uniform():
    assert torch.equal(power_law_pmf(T, 0.0), torch.full((T,), 1.0 / T, dtype=torch.float64))
    assert torch.equal(power_law_pmf(T, 0.0, decreasing=True), torch.full((T,), 1.0 / T, dtype=torch.float64))


def test_module_draws_target_and_memory_timesteps_from_their_distributions(tmp_path):
    module = _module(tmp_path, target_power=1.0)
    assert torch.equal(module.target_pmf, power_law_pmf(T, 1.0))
    assert torch.equal(module.memory_pmf, power_law_pmf(T, 1.0, decreasing=True))  # b = a by default
    torch.manual_seed(0)
    assert _chi_square(module.sample_timesteps(100_000), module.target_pmf) < CRITICAL
    assert _chi_square(module.memory_timesteps(100_000), module.memory_pmf) < CRITICAL
    assert torch.equal(_module(tmp_path, memory_power=3.0).memory_pmf, power_law_pmf(T, 3.0, decreasing=True))
    assert torch.equal(module.importance_weights(torch.arange(T)), torch.ones(T))  # sampling: no extra weights


def test_loss_weight_option_draws_uniform_t_and_weights_proportional_to_the_pmf(tmp_path):
    module = _module(tmp_path, weighting="loss_weight", target_power=1.0, memory_power=2.0)
    torch.manual_seed(0)
    assert _chi_square(module.sample_timesteps(100_000), power_law_pmf(T, 0.0)) < CRITICAL
    assert _chi_square(module.memory_timesteps(100_000), power_law_pmf(T, 0.0)) < CRITICAL
    t = torch.arange(T)
    for memory, pmf in ((False, power_law_pmf(T, 1.0)), (True, power_law_pmf(T, 2.0, decreasing=True))):
        weights = module.importance_weights(t, memory=memory).double()
        assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
        ratio = weights / pmf
        assert torch.allclose(ratio, torch.full_like(ratio, T), rtol=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        _module(tmp_path, weighting="snr")


def test_memory_bank_is_generated_once_reused_and_invalidated_by_the_model_identity(tmp_path, monkeypatch):
    calls = []

    def spy(module):
        original = module.generate

        def generate(**kwargs):
            calls.append(kwargs)
            return original(**kwargs)

        monkeypatch.setattr(module, "generate", generate)
        return module

    first = spy(_module(tmp_path))
    bank = first.prepare_memory_bank()
    assert bank.shape == (4, 3, 32, 32) and bank.dtype == torch.uint8
    assert len(calls) == 1
    assert calls[0]["prompts"] == [""] * 4 and calls[0]["steps"] == 2 and calls[0]["guidance_scale"] == 1.0

    second = spy(_module(tmp_path))  # same model, same settings: the cached bank is loaded
    assert torch.equal(second.prepare_memory_bank(), bank) and len(calls) == 1

    monkeypatch.setattr(second, "model_identity", lambda: "another-pretrained-model")
    assert second.memory_bank_folder() != first.memory_bank_folder()
    second.prepare_memory_bank()
    assert len(calls) == 2

    third = spy(_module(tmp_path, memory_sample_steps=3))  # sampler settings are part of the key too
    third.prepare_memory_bank()
    assert len(calls) == 3


def test_each_step_holds_the_configured_split_and_memory_uses_the_empty_prompt(tmp_path, monkeypatch):
    module = _module(tmp_path, memory_ratio=0.2, retention_weight=0.1)
    bank = module.prepare_memory_bank()
    losses, prompts, pixels = [], [], []
    original_loss, original_prompts, original_images = (
        module.diffusion_loss,
        module.text_features,
        module.encode_images,
    )

    def diffusion_loss(x0, condition, timesteps=None, noise=None, weighted=True):
        losses.append((len(x0), len(condition), timesteps.clone()))
        return original_loss(x0, condition, timesteps, noise, weighted)

    def text_features(batch_prompts):
        prompts.append(list(batch_prompts))
        return original_prompts(batch_prompts)

    def encode_images(images):
        pixels.append(images.clone())
        return original_images(images)

    monkeypatch.setattr(module, "diffusion_loss", diffusion_loss)
    monkeypatch.setattr(module, "text_features", text_features)
    monkeypatch.setattr(module, "encode_images", encode_images)
    module.train()
    for size, target, memory in ((10, 8, 2), (16, 13, 3), (3, 2, 1), (1, 1, 1)):
        losses.clear(), prompts.clear(), pixels.clear()
        batch = _batch(size)
        loss, logs = module.training_loss(batch)
        assert module.memory_count(size) == memory
        assert [entry[:2] for entry in losses] == [(target + memory, target + memory)]  # one forward for both
        assert prompts == [batch["prompts"][:target], [""] * memory]
        assert torch.equal(pixels[0][:target], batch["pixel_values"][:target])
        drawn = torch.round((pixels[0][target:] + 1) * 127.5).to(torch.uint8)
        # memory images come from the bank, flipped or not (memory_flip, the released loader's random flip)
        assert all(any(torch.equal(image, b) or torch.equal(image, b.flip(-1)) for b in bank) for image in drawn)
        assert torch.allclose(loss, logs["loss/reconsolidation"] + 0.1 * logs["loss/retention"])


def test_memory_draws_are_reproducible_per_step_and_differ_between_steps(tmp_path):
    module = _module(tmp_path, memory_size=8)
    module.prepare_memory_bank()
    first, again = module.draw_memory(3, (32, 32)), module.draw_memory(3, (32, 32))
    assert torch.equal(first, again) and first.min() >= -1 and first.max() <= 1
    module._batch_idx = 1
    assert not torch.equal(first, module.draw_memory(3, (32, 32)))
    assert module.draw_memory(2, (16, 16)).shape == (2, 3, 16, 16)  # resized to the training resolution
    # memory_flip (released: on): about half the draws are mirrored bank images; off: none are.
    bank = module.memory_bank.float() / 127.5 - 1.0
    draws = torch.cat([module.draw_memory(8, (32, 32)) for module._batch_idx in range(2, 12)])
    mirrored = [not any(torch.equal(d, b) for b in bank) and any(torch.equal(d, b.flip(-1)) for b in bank)
                for d in draws]  # fmt: skip
    assert 0.3 < sum(mirrored) / len(draws) < 0.7
    module.hparams.memory_flip = False
    draws = torch.cat([module.draw_memory(8, (32, 32)) for module._batch_idx in range(2, 12)])
    assert all(any(torch.equal(d, b) for b in bank) for d in draws)
    module.hparams.memory_flip = True
    module._batch_idx = 1
    # An aspect bucket (h 16, w 32): the square bank images are resized to cover it and centre-cropped, not stretched.
    module._batch_idx = 0
    import torch.nn.functional as F

    wide = module.draw_memory(3, (16, 32))
    assert wide.shape == (3, 3, 16, 32)
    torch.testing.assert_close(wide, first[..., 8:24, :], rtol=0, atol=0)  # the bank is 32 px: a crop, no resize
    tall = module.draw_memory(3, (16, 8))
    half = F.interpolate(first, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(tall, half[..., :, 4:12])


def test_ratio_zero_is_plain_fine_tuning_with_the_target_distribution(tmp_path, monkeypatch):
    module = _module(tmp_path, memory_ratio=0.0)
    monkeypatch.setattr(module, "generate", lambda **kwargs: pytest.fail("no bank is needed"))
    loss, logs = module.training_loss(_batch(4))
    assert set(logs) == {"loss/reconsolidation"} and module.memory_bank is None


def test_diff_tuning_fits_end_to_end_with_a_trainer(tmp_path):
    torch.manual_seed(0)
    data_dir = write_images(tmp_path / "data", 4, captions=True)
    module = _module(tmp_path, lr=1e-3)
    before = {n: p.detach().clone() for n, p in module.denoiser.named_parameters()}
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path)
    data = LimitedDataModule(str(data_dir), resolution=32, batch_size=4, repeats=2)
    trainer.fit(module, data)
    assert trainer.global_step == 3 and module.memory_bank.shape == (4, 3, 32, 32)
    assert module.memory_bank_folder().exists()
    parts = module.last_loss_parts  # every step's parts (they reach the logger only on its logging steps)
    assert {"loss", "loss/reconsolidation", "loss/retention"} <= parts.keys()
    assert all(torch.isfinite(parts[k]) for k in parts)
    assert any(not torch.equal(before[n], p) for n, p in module.denoiser.named_parameters())
