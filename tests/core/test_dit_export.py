"""A DiT of N < 1000 classes, padded so that plain ``diffusers.DiTPipeline`` samples it with guidance (null class
1000), gives exactly what the original model gives with its own null class N."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_components
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from lightning_ft.core.dit_export import (
    dit_export_record,
    dit_pipeline_denoiser,
    true_class_count,
)
from lightning_ft.core.trainable import apply_trainable, has_lora, merged_copy

N = 48  # num_embeds_ada_norm of configs/model/tiny_dit.yaml
LABELS = [3, 47, 0]
SEED, STEPS = 7, 2


def tiny_dit(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    config = {**tiny_components("tiny_dit")["denoiser"]["config"], **overrides}
    torch.manual_seed(seed)
    return DiTTransformer2DModel(**config).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(**tiny_components("tiny_dit")["vae"]["config"]).eval()


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def pipeline_images(transformer, vae, guidance: float) -> np.ndarray:
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler())
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(SEED)
    return pipe(
        LABELS, guidance_scale=guidance, generator=generator, num_inference_steps=STEPS, output_type="np"
    ).images


@torch.no_grad()
def reference_images(model, vae, null_label: int, guidance: float) -> np.ndarray:
    """DiTPipeline's sampler written out, driving ``model`` with ``null_label`` as the unconditional class: the batch
    doubled (conditional half, null half), guidance on the first ``in_channels`` output channels, the learned-sigma
    channels dropped, DDIM steps, VAE decode, [0, 1] images in NHWC."""
    channels, size = model.config.in_channels, model.config.sample_size
    sampler = scheduler()
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn((len(LABELS), channels, size, size), generator=generator)
    labels = torch.tensor(LABELS)
    both_labels = torch.cat([labels, torch.full_like(labels, null_label)])
    sampler.set_timesteps(STEPS)
    for t in sampler.timesteps:
        out = model(torch.cat([x, x]), t.expand(2 * len(x)), class_labels=both_labels).sample
        cond, uncond = out[:, :channels].chunk(2)
        x = sampler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    images = vae.decode(x / vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_padded_table_keeps_classes_and_puts_the_null_row_at_1000():
    model = tiny_dit(num_layers=2)  # two blocks: each has its own label table
    padded = dit_pipeline_denoiser(model)
    assert padded is not model and padded.config.num_embeds_ada_norm == 1000
    assert model.config.num_embeds_ada_norm == N  # the original is untouched
    tables = [b.norm1.emb.class_embedder for b in padded.transformer_blocks]
    originals = [b.norm1.emb.class_embedder for b in model.transformer_blocks]
    assert len(tables) == 2
    for table, original in zip(tables, originals):
        assert table.embedding_table.num_embeddings == 1001 and table.num_classes == 1000
        assert original.embedding_table.num_embeddings == N + 1
        weight, source = table.embedding_table.weight, original.embedding_table.weight
        assert torch.equal(weight[:N], source[:N])
        assert torch.equal(weight[N:], source[N].expand(1001 - N, -1))  # N..1000: all the null row
    x, t = torch.randn(4, 4, 16, 16), torch.tensor([3, 300, 600, 999])
    with torch.no_grad():
        mine = model(x, t, class_labels=torch.tensor([0, 47, N, N])).sample
        theirs = padded(x, t, class_labels=torch.tensor([0, 47, 1000, 500])).sample
    assert torch.equal(mine, theirs)
    assert not padded.training  # a pipeline samples in the model's mode: no label dropout switched on by the copy


def test_padded_model_saves_and_loads_as_a_1000_class_dit(tmp_path):
    padded = dit_pipeline_denoiser(tiny_dit())
    padded.save_pretrained(tmp_path / "transformer")
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    assert loaded.config.num_embeds_ada_norm == 1000
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.tensor([5, 1000])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, class_labels=y).sample, padded(x, t, class_labels=y).sample)


def test_dit_pipeline_with_guidance_matches_the_original_model_with_its_null_class():
    model, vae = tiny_dit(), tiny_vae()
    padded = dit_pipeline_denoiser(model)
    # The unpadded model cannot be guided by DiTPipeline at all: there is no row 1000.
    with pytest.raises(IndexError):
        pipeline_images(model, vae, guidance=3.0)

    images = pipeline_images(padded, vae, guidance=3.0)
    expected = reference_images(model, vae, null_label=N, guidance=3.0)
    assert images.shape == (3, 32, 32, 3)
    # The images are not saturated by the clamp (the comparison is about values, not about 0 and 1).
    assert ((images > 0.01) & (images < 0.99)).mean() > 0.5
    np.testing.assert_allclose(images, expected, atol=1e-4, rtol=0)
    # The comparison can tell: guidance, and which row is the null one, both change the images.
    unguided = reference_images(model, vae, null_label=N, guidance=1.0)
    wrong_null = reference_images(model, vae, null_label=0, guidance=3.0)
    assert np.abs(images - unguided).max() > 1e-2
    assert np.abs(images - wrong_null).max() > 1e-2


def test_dit_pipeline_without_guidance_is_the_same_for_original_and_padded():
    model, vae = tiny_dit(), tiny_vae()
    original = pipeline_images(model, vae, guidance=1.0)
    padded = pipeline_images(dit_pipeline_denoiser(model), vae, guidance=1.0)
    np.testing.assert_array_equal(original, padded)


def test_another_null_row_and_lora_are_carried_into_the_copy():
    model = tiny_dit()
    apply_trainable(model, "lora", lora_rank=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    padded = dit_pipeline_denoiser(model, null_class=5)
    assert has_lora(model) and not has_lora(padded)
    merged = merged_copy(model)
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([20, 400, 800])
    with torch.no_grad():
        expected = merged(x, t, class_labels=torch.tensor([7, 5, 5])).sample
        got = padded(x, t, class_labels=torch.tensor([7, 1000, N])).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_a_1000_class_dit_is_returned_as_it_is_and_other_models_are_refused():
    full = tiny_dit(num_embeds_ada_norm=1000)
    assert dit_pipeline_denoiser(full) is full
    with pytest.raises(ValueError, match="null class"):
        dit_pipeline_denoiser(full, null_class=3)
    with pytest.raises(ValueError, match="1001 classes"):
        dit_pipeline_denoiser(tiny_dit(num_embeds_ada_norm=1001))
    with pytest.raises(ValueError, match="null_class=49"):
        dit_pipeline_denoiser(tiny_dit(), null_class=49)
    with pytest.raises(TypeError, match="DiTTransformer2DModel"):
        dit_pipeline_denoiser(torch.nn.Linear(2, 2))


def test_export_record_and_true_class_count():
    record = dit_export_record(N, N)
    assert record == {"num_classes": N, "null_class": N, "pipeline_null_class": 1000, "padded": True}
    padded = dit_pipeline_denoiser(tiny_dit())
    assert true_class_count(padded, {"backbones": {}, "class_labels": record}) == N
    assert true_class_count(padded, record) == N
    assert true_class_count(padded) == 1000  # without the record only the config is known
    assert true_class_count(tiny_dit()) == N
    assert dit_export_record(1000, 1000)["padded"] is False
    with pytest.raises(ValueError, match="num_classes"):
        dit_export_record(1001, 1000)
    with pytest.raises(ValueError, match="null_class"):
        dit_export_record(N, N + 1)
