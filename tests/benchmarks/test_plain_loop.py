"""The overhead benchmark's plain PyTorch loop does the same math as DreamBooth: same loss for the same batch and
random state, and the same weights after an update. Without this the overhead it measures would compare two
different computations."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_module

from benchmarks.plain_loop import PlainDreamBooth


def _batch(prior: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "prompts": ["a sks star"] * 2}
    if prior:
        batch["class_pixel_values"] = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        batch["class_prompts"] = ["a star"] * 2
    return batch


@pytest.mark.parametrize("prior", [False, True], ids=["instance", "prior_preservation"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_plain_loop_matches_dreambooth_loss_and_update(prior, prediction_type):
    module = tiny_module(prediction_type=prediction_type, prior_loss_weight=0.7, lr=1e-3, weight_decay=0.0)
    module.train()
    batch = _batch(prior)
    plain = PlainDreamBooth(module, [batch])
    before = [p.detach().clone() for p in module.denoiser.parameters()]

    torch.manual_seed(5)
    expected, _ = module.training_loss(batch)
    torch.manual_seed(5)
    got = plain.step()
    assert torch.allclose(got, expected.detach(), rtol=1e-6, atol=1e-7)

    optimizer = module.configure_optimizers()["optimizer"]
    expected.backward()
    optimizer.step()
    for (name, ours), theirs in zip(module.denoiser.named_parameters(), plain.unet.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6), name
    moved = max((a - b).abs().max() for a, b in zip(module.denoiser.parameters(), before))
    assert moved > 1e-4  # the update did move the weights (so equality above is not vacuous)


def test_plain_loop_runs_past_the_end_of_an_epoch():
    """A StopIteration escaping from the loop would end the framework's epoch when the loop runs in a callback."""
    module = tiny_module()
    plain = PlainDreamBooth(module, [_batch(False)])
    for _ in range(3):
        assert torch.isfinite(plain.step())
    assert plain.epoch == 2
