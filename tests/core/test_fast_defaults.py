"""The fast defaults (issue: faster than the scripts users run instead): cached latents decided from the data's
augmentation, fused AdamW, loss parts logged only on logging steps. Each must keep the math of the per-step-encoding
loop: the same loss on the same batch and the same update."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from conftest import perturb, quiet_trainer, tiny_module, write_images
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from benchmarks.plain_loop import PlainDreamBooth
from lightning_ft.data import LimitedDataModule
from lightning_ft.data.folder import distinct_views


def _batch() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "pixel_values": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "prompts": ["a sks star"] * 2,
        "class_pixel_values": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "class_prompts": ["a star"] * 2,
    }


def test_defaults_give_the_per_step_encoding_loops_losses_and_updates():
    """Cached latents (second step served from the cache), cached text, fused AdamW: step by step the same losses
    as diffusers-style per-step encoding with torch's default AdamW, and the same weights after each update."""
    # Seeded, and Adam's eps well above the gradients' rounding noise: with eps=1e-8 an element whose gradient is
    # ~1e-8 moves by up to lr whichever way rounding tips it, so equal math could not show as equal weights (the
    # unseeded test passed or failed by its random initialisation).
    torch.manual_seed(0)
    module = tiny_module(cache_latents=True, lr=1e-3, weight_decay=0.0, adam_eps=1e-4)
    perturb(module)
    module.train()
    batch = _batch()
    plain = PlainDreamBooth(module, [batch, batch])
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True and plain.optimizer.defaults["fused"] is None
    for step in range(2):
        torch.manual_seed(10 + step)
        ours, _ = module.training_loss(batch)
        torch.manual_seed(10 + step)
        theirs = plain.step()
        assert torch.allclose(ours.detach(), theirs, rtol=1e-5, atol=1e-7), step
        ours.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for (name, a), b in zip(module.denoiser.named_parameters(), plain.unet.parameters()):
            assert torch.allclose(a, b, atol=2e-6), (step, name)
    assert module.latent_cache.misses == 4 and module.latent_cache.hits == 4  # step 2 encoded nothing
    assert module.text_cache.misses == 2 and module.text_cache.hits == 6  # two distinct prompts


def test_fused_adamw_can_be_turned_off_and_refuses_what_it_cannot_run():
    assert not tiny_module(fused_adamw=False).configure_optimizers()["optimizer"].defaults["fused"]
    module = tiny_module(fused_adamw=True)
    module.denoiser.conv_in.to("meta")  # a device torch has no fused kernel for
    with pytest.raises(ValueError, match=r"model.fused_adamw=true: torch has no fused AdamW for parameters on .*meta"):
        module.configure_optimizers()


def test_distinct_views_counts_crops_and_flips():
    square, wide = Image.new("RGB", (32, 32)), Image.new("RGB", (48, 32))
    assert distinct_views(square, 32, center_crop=True, flip=False) == 1
    assert distinct_views(square, 32, center_crop=True, flip=True) == 2
    assert distinct_views(square, 32, center_crop=False, flip=False) == 1  # nothing to crop
    assert distinct_views(wide, 32, center_crop=False, flip=True) == 17 * 2
    assert distinct_views(wide, 16, center_crop=False, flip=False) == (24 - 16 + 1) * 1


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"center_crop": True, "random_flip": True}, True),  # 2 views per image
        ({"center_crop": False, "random_flip": False}, False),  # 17 crops of each 48x32 image at 32
    ],
    ids=["centre_crop_flip", "random_crops"],
)
def test_auto_latent_cache_follows_the_augmentation(tmp_path, settings, expected, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 32), (40 * i, 90, 200)).save(folder / f"wide_{i}.png")
    module = tiny_module()
    assert module.latent_cache is None  # auto: undecided until the data is known
    data = LimitedDataModule(str(folder), instance_prompt="a sks star", resolution=32, batch_size=2, repeats=2,
                             **settings)  # fmt: skip
    with caplog.at_level("INFO"):
        quiet_trainer(max_steps=1, default_root_dir=tmp_path).fit(module, data)
    assert (module.latent_cache is not None) is expected
    views = 6 if expected else 51
    assert f"model.cache_latents=auto: {'on' if expected else 'off'} ({views} distinct views of 3 images" in caplog.text


def test_explicit_latent_cache_setting_wins_and_unknown_data_leaves_it_off(tmp_path):
    folder = write_images(tmp_path / "data", 2)
    off = tiny_module(cache_latents=False)
    data = LimitedDataModule(str(folder), instance_prompt="a sks star", resolution=32, batch_size=2, repeats=1)
    quiet_trainer(max_steps=1, default_root_dir=tmp_path).fit(off, data)
    assert off.latent_cache is None

    class Loose(L.LightningDataModule):  # a user's own data module: its augmentation is unknown
        def train_dataloader(self):
            return torch.utils.data.DataLoader([{k: v[0] for k, v in _batch().items()}] * 2, batch_size=2)

    auto = tiny_module()
    quiet_trainer(max_steps=1, default_root_dir=tmp_path).fit(auto, Loose())
    assert auto.latent_cache is None


def test_loss_parts_reach_the_logger_on_its_steps_and_the_module_on_every_step(tmp_path):
    folder = write_images(tmp_path / "data", 2)
    module = tiny_module()
    data = LimitedDataModule(str(folder), instance_prompt="a sks star", class_prompt="a star", num_class_images=2,
                             resolution=32, batch_size=1, repeats=4)  # fmt: skip
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: float(v) for k, v in pl_module.last_loss_parts.items()})

    logger = CSVLogger(tmp_path, name="log")
    trainer = quiet_trainer(max_steps=4, logger=logger, log_every_n_steps=2, callbacks=[Record()])
    trainer.fit(module, data)
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    with_parts = [int(r["step"]) for r in rows if r.get("train/loss/instance")]
    with_loss = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert with_parts == with_loss == [1, 3]  # Lightning's logging steps, no others
    assert len(seen) == 4 and all({"loss", "loss/instance", "loss/prior"} <= s.keys() for s in seen)
    logged = {int(r["step"]): float(r["train/loss/prior"]) for r in rows if r.get("train/loss/prior")}
    assert logged[3] == pytest.approx(seen[3]["loss/prior"])


def test_cli_progress_bar_shows_every_steps_loss(tmp_path):
    """``train/loss`` is logged on the logger's steps only; the CLI's bar still shows each step's loss."""
    from lightning_ft.cli import StepsProgressBar

    folder = write_images(tmp_path / "data", 2)
    module = tiny_module()
    data = LimitedDataModule(str(folder), instance_prompt="a sks star", resolution=32, batch_size=1, repeats=4)
    bar, shown = StepsProgressBar(), []

    class Read(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            shown.append((bar.get_metrics(trainer, pl_module)["train/loss"], float(pl_module.last_loss_parts["loss"])))

    quiet_trainer(max_steps=3, log_every_n_steps=50, callbacks=[bar, Read()], enable_progress_bar=True).fit(
        module, data
    )
    assert len(shown) == 3 and all(text == f"{value:.3f}" for text, value in shown)
    assert len({value for _, value in shown}) == 3  # a new value every step, not the last logged one


def test_cli_progress_bar_redraws_at_most_every_interval_and_ends_on_the_right_count(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar

    from lightning_ft.cli import StepsProgressBar

    folder = write_images(tmp_path / "data", 2)
    data = LimitedDataModule(str(folder), instance_prompt="a sks star", resolution=32, batch_size=1, repeats=4)
    drawn, original = [], RichProgressBar.on_train_batch_end

    def draw(self, trainer, pl_module, outputs, batch, batch_idx):
        drawn.append(batch_idx)
        original(self, trainer, pl_module, outputs, batch, batch_idx)

    monkeypatch.setattr(RichProgressBar, "on_train_batch_end", draw)
    bar = StepsProgressBar(redraw_seconds=2.5)
    clock = iter(range(100))  # one "second" per batch end: 0, 1, 2, ...
    bar.clock = lambda: float(next(clock))
    quiet_trainer(max_steps=6, callbacks=[bar], enable_progress_bar=True).fit(tiny_module(), data)
    assert drawn == [0, 3, 5]  # t=0, t=3 (2.5 s after the last redraw), and the last step
    assert bar.progress.tasks[bar.train_progress_bar_id].completed == 6


def test_image_keys_are_hashed_before_the_transfer_and_encoding_uses_them(monkeypatch):
    """On an accelerator, hashing in the step would copy the images back to the host: the keys are made on the CPU
    in on_before_batch_transfer, and the loss is the same with them as with hashing in the step."""
    import lightning_ft.core.encoding as encoding

    module = tiny_module(cache_latents=True)
    perturb(module)
    module.train()
    batch = module.on_before_batch_transfer(_batch(), 0)
    assert len(batch["pixel_values_keys"]) == 2 and len(batch["class_pixel_values_keys"]) == 2
    assert batch["pixel_values_keys"][0] == encoding.tensor_key(batch["pixel_values"][0])
    calls = []
    monkeypatch.setattr(encoding, "tensor_key", lambda t: calls.append(1) or b"never")
    torch.manual_seed(4)
    keyed, _ = module.training_loss(batch)
    assert calls == [] and module.latent_cache.misses == 4
    monkeypatch.undo()
    torch.manual_seed(4)
    hashed, _ = module.training_loss({k: v for k, v in batch.items() if not k.endswith("_keys")})
    assert torch.equal(keyed, hashed) and module.latent_cache.hits == 4  # the same entries, found by content


def test_the_last_steps_loss_ends_in_callback_metrics_between_logging_steps(tmp_path):
    """A sweep ranks runs by callback_metrics at the end of fit: the last step is logged even off the logger's
    period (3 steps, logging every 50)."""
    folder = write_images(tmp_path / "data", 2)
    module = tiny_module()
    data = LimitedDataModule(str(folder), instance_prompt="a sks star", resolution=32, batch_size=1, repeats=4)
    trainer = quiet_trainer(max_steps=3, log_every_n_steps=50)
    trainer.fit(module, data)
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(module.last_loss_parts["loss"].item())


def test_a_cached_value_does_not_depend_on_the_inputs_it_was_computed_with():
    """Kernels can round differently at another batch size: the cache computes each missing key alone, so a resumed
    run (empty cache, other groupings) gets an unbroken run's values bitwise."""
    from lightning_ft.core.encoding_cache import EncodingCache

    values = {"a": 1.0, "b": 2.0, "c": 3.0}

    def batch_dependent(names):  # a computation whose result depends on the batch it ran in
        return lambda indices: torch.tensor([[values[names[i]] + 1e-3 * len(indices)] for i in indices])

    first, second = EncodingCache(), EncodingCache()
    first.lookup(["a", "b"], batch_dependent(["a", "b"]))
    second.lookup(["b", "c", "a"], batch_dependent(["b", "c", "a"]))
    assert torch.equal(first.store["b"], second.store["b"]) and torch.equal(first.store["a"], second.store["a"])
    assert second.misses == 3 and len(second) == 3
