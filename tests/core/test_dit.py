"""Class-conditional DiT support: the null class, learned-sigma outputs, label dropout, per-image labels, export."""

from __future__ import annotations

import json
import types

import pytest
import torch
from conftest import tiny_components, train_steps, write_images

from lightning_ft.core import DiffusionBase
from lightning_ft.data import LimitedDataModule
from lightning_ft.methods.diff_tuning import DiffTuning
from lightning_ft.methods.sdft import SelfDistillationFineTuning


def dit_module(cls=DiffusionBase, **kwargs):
    kwargs.setdefault("sample_steps", 2)
    return cls(components=tiny_components("tiny_dit"), **kwargs)


def _perturb(module, scale=0.05):
    """Random weights everywhere: diffusers zero-initialises parts of the DiT, which would hide the labels."""
    with torch.no_grad():
        for p in module.denoiser.parameters():
            p.add_(scale * torch.randn_like(p))


def _batch(n: int = 4):
    return {"pixel_values": torch.rand(n, 3, 32, 32) * 2 - 1, "class_labels": torch.arange(n) * 5}


def test_a_dit_is_class_conditional_and_uses_its_own_null_class():
    module = dit_module()
    assert module.family.needs_labels()
    assert module.null_class == 48  # the DiT's extra embedding row, index num_classes


def test_the_dits_own_label_dropout_is_off_so_training_forwards_are_deterministic():
    torch.manual_seed(0)
    module = dit_module()
    _perturb(module)
    module.train()
    x, t, y = torch.randn(64, 4, 16, 16), torch.full((64,), 500), torch.arange(64) % 48
    c = module.encode_inputs(y)
    first, second = module.predict(x, t, c), module.predict(x, t, c)
    # With diffusers' built-in 10% label dropout left on, some of 64 labels would differ between the two calls.
    assert torch.equal(first, second)
    assert not torch.allclose(
        first, module.predict(x, t, module.encode_inputs(torch.full_like(y, 48)))
    )  # the null class is distinct


def test_condition_dropout_replaces_labels_by_the_null_class_in_training_only():
    module = dit_module(condition_dropout=1.0)
    batch = {"class_labels": torch.tensor([1, 2, 3])}
    module.train()
    assert module.encode_conditions(batch).fields["class_labels"].tolist() == [48, 48, 48]
    module.eval()
    assert module.encode_conditions(batch).fields["class_labels"].tolist() == [1, 2, 3]


def test_a_null_class_outside_the_embedding_table_is_rejected():
    with pytest.raises(ValueError, match="model.null_class=49"):
        dit_module(null_class=49)


def test_learned_sigma_outputs_are_cut_to_the_mean_channels():
    torch.manual_seed(0)
    module = dit_module()
    _perturb(module)
    assert module.denoiser.config.out_channels == 8
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([0, 1])
    raw = module.denoiser(x, t, class_labels=y).sample
    assert raw.shape[1] == 8
    assert torch.equal(module.predict(x, t, module.encode_inputs(y)), raw[:, :4])


def test_training_updates_the_transformer():
    torch.manual_seed(0)
    module = dit_module(lr=1e-3, condition_dropout=0.5)
    before = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    logs = train_steps(module, _batch(), steps=2)
    assert torch.isfinite(logs["loss/diffusion"])
    changed = [k for k, v in module.denoiser.state_dict().items() if not torch.equal(v, before[k])]
    assert any("attn1.to_q" in k for k in changed) and any("emb.class_embedder" in k for k in changed)


def test_guidance_uses_the_null_class_and_changes_samples():
    torch.manual_seed(0)
    module = dit_module()
    _perturb(module)
    plain = module.generate(labels=[0, 7], seeds=[0, 1], guidance_scale=1.0)
    guided = module.generate(labels=[0, 7], seeds=[0, 1], guidance_scale=3.0)
    assert plain.shape == (2, 3, 32, 32) and not torch.allclose(plain, guided)
    # Same seed, another label: another image (the label reaches the sampler).
    assert not torch.allclose(plain[0], module.generate(labels=[5], seeds=[0], guidance_scale=1.0)[0])


def test_export_is_a_dit_pipeline_that_reloads_to_the_same_samples(tmp_path):
    from diffusers import DiffusionPipeline, DiTPipeline

    torch.manual_seed(0)
    module = dit_module(guidance_scale=2.0)
    _perturb(module)
    before = module.generate(labels=[0, 5, 47], seeds=[0, 1, 2])
    module.save_pretrained(tmp_path / "export")
    assert isinstance(DiffusionPipeline.from_pretrained(tmp_path / "export"), DiTPipeline)
    reloaded = DiffusionBase(pretrained=str(tmp_path / "export"), sample_steps=2, guidance_scale=2.0)
    assert reloaded.null_class == 48
    torch.testing.assert_close(reloaded.generate(labels=[0, 5, 47], seeds=[0, 1, 2]), before, rtol=0, atol=1e-6)


def test_sdft_distillation_is_exactly_zero_before_the_first_update_on_a_dit(monkeypatch):
    torch.manual_seed(0)
    module = dit_module(SelfDistillationFineTuning)
    monkeypatch.setattr(module, "sample_timesteps", lambda n: torch.tensor([999, 800, 600, 500][:n]))
    module.train()
    loss, logs = module.training_loss(_batch())
    assert logs["loss/distill"].item() == 0.0
    assert torch.equal(loss.detach(), logs["loss/diffusion"])


def test_diff_tuning_memory_samples_cover_the_classes_and_train_with_the_null_class(tmp_path):
    module = dit_module(DiffTuning, memory_size=96, memory_cache_dir=str(tmp_path))
    labels = list(module.memory_inputs().labels)
    assert sorted(set(labels)) == list(range(48))  # every real class, never the null class
    assert module.null_condition(3).fields["class_labels"].tolist() == [48, 48, 48]


# ------------------------------------------------------------------------------------- per-image class labels
def _labelled_folder(tmp_path, labels):
    folder = write_images(tmp_path / "domain", len(labels))
    rows = [{"file": f"img_{i:02d}.png", "caption": "x", **({} if c is None else {"label": c})}
            for i, c in enumerate(labels)]  # fmt: skip
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_jsonl_labels_reach_the_batches(tmp_path):
    folder = _labelled_folder(tmp_path, [3, 7, 11])
    dm = LimitedDataModule(str(folder), captions_file=str(folder / "captions.jsonl"), resolution=32, repeats=1)
    dm.setup("fit")
    assert dm.dataset.labels == [3, 7, 11]
    assert sorted(int(dm.dataset[i]["class_labels"]) for i in range(len(dm.dataset))) == [3, 7, 11]
    classes = [int(c) for batch in dm.predict_dataloader() for c in batch["class_labels"]]
    assert sorted(set(classes)) == [3, 7, 11]


@pytest.mark.parametrize(
    "labels, message",
    [([3, None, 5], "labels some images but not"), ([3, -1, 5], "integer >= 0"), ([3, "a", 5], "integer")],
)
def test_bad_jsonl_labels_are_named(tmp_path, labels, message):
    folder = _labelled_folder(tmp_path, labels)
    dm = LimitedDataModule(str(folder), captions_file=str(folder / "captions.jsonl"), resolution=32)
    with pytest.raises(ValueError, match=message) as error:
        dm.setup("fit")
    assert "captions.jsonl" in str(error.value)


def test_a_class_conditional_model_without_labels_fails_naming_the_keys(tmp_path):
    folder = write_images(tmp_path / "plain", 2)
    dm = LimitedDataModule(str(folder), instance_prompt="x", resolution=32)
    dm.trainer = types.SimpleNamespace(lightning_module=dit_module())
    with pytest.raises(ValueError, match="data.class_label"):
        dm.setup("fit")
