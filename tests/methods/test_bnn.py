"""BayesianFineTuning: what trains, the KL term, and an export that is the plain base architecture holding the means."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_module, train_steps
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import Attention

from lightning_ft.core.trainable import DEFAULT_LORA_TARGETS
from lightning_ft.methods.bnn import BayesianFineTuning
from lightning_ft.nn.bayesian import BayesianLinear, bayesian_layers

PROMPTS = ["a red star on a gray background", "a sks star on a navy background"]


def _batch():
    return {
        "pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1,
        "prompts": ["a sks star", "a sks star on a gray background"],
        "class_pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1,
        "class_prompts": ["a star", "a star on a gray background"],
    }


def _train_steps(module, steps=3):
    return train_steps(module, _batch(), steps)


def _move_off_init(module, sigma=0.2):
    # Fresh tiny models output near zero and LoRA starts at identity: move the means so comparisons are not
    # trivially equal, and widen sigma so a sampled weight would visibly change the images.
    with torch.no_grad():
        for name, p in module.denoiser.named_parameters():
            if name.endswith("_sigma"):
                p.fill_(sigma)
            elif p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def _pipeline_images(pipe, seeds, steps, guidance):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt")
    return out.images.float()


def _assert_still_bayesian(module, count):
    layers = bayesian_layers(module.denoiser)
    assert len(layers) == count and all(p.requires_grad for layer in layers.values() for p in layer.parameters())
    module.train()
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond = module.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        assert not torch.equal(module.predict(x, t, cond), module.predict(x, t, cond))


def test_full_bnn_trains_the_whole_unet_with_bayesian_linears_and_adds_the_kl():
    torch.manual_seed(0)
    base_count = sum(p.numel() for p in tiny_module().denoiser.parameters())
    module = tiny_module(BayesianFineTuning, lr=1e-3)
    layers = bayesian_layers(module.denoiser)
    assert len(layers) == len(module.bayesian_names) == 24
    sigma_count = sum(layer.num_bayesian for layer in layers.values())
    trainable = [p for p in module.denoiser.parameters() if p.requires_grad]
    assert len(trainable) == len(list(module.denoiser.parameters()))
    assert sum(p.numel() for p in trainable) == base_count + sigma_count
    assert not any(p.requires_grad for p in module.text_encoder.parameters())

    logs = _train_steps(module, steps=2)
    assert {"loss/instance", "loss/prior", "loss/kl"} <= logs.keys()
    assert logs["loss/kl"] > 0  # AdamW moved mu away from the pretrained prior mean
    assert all(layer.weight_sigma.min() > 0 for layer in layers.values())

    # The KL enters the loss with exactly kl_weight (same seed: same noise, timesteps and weight samples).
    batch = _batch()
    torch.manual_seed(1)
    loss_off, _ = module.training_loss(batch)
    module.hparams.kl_weight = 0.5
    torch.manual_seed(1)
    loss_on, logs = module.training_loss(batch)
    assert loss_on.requires_grad and logs["loss/kl"] > 0
    assert torch.allclose(loss_on - loss_off, 0.5 * logs["loss/kl"], rtol=1e-4)
    assert torch.allclose(module.kl(), logs["loss/kl"])


def test_bnn_lora_trains_only_lora_and_up_sigma_and_base_is_untouched():
    torch.manual_seed(0)
    rank = 3
    module = tiny_module(BayesianFineTuning, trainable="lora", lora_rank=rank, lr=1e-2)
    expected, ups = 0, 0
    for sub in module.denoiser.modules():
        if isinstance(sub, Attention):
            for name in DEFAULT_LORA_TARGETS:
                lora = sub.get_submodule(name)
                expected += rank * (lora.base_layer.in_features + 2 * lora.base_layer.out_features)  # A, B mu, B sigma
                ups += isinstance(lora.lora_B["default"], BayesianLinear)
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert ups == len(module.bayesian_names) == 32
    assert all("lora_" in n for n in trainable) and not any("lora_A" in n and "sigma" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in trainable.items()}
    _train_steps(module)
    params = dict(module.named_parameters())
    assert all(torch.equal(v, params[n]) for n, v in frozen_before.items())
    for kind in ("lora_A", "lora_B.default.weight_mu", "lora_B.default.weight_sigma"):
        assert any(not torch.equal(v, params[n]) for n, v in trained_before.items() if kind in n), kind


def test_unsupported_settings_fail_clearly():
    with pytest.raises(ValueError, match="'full' or 'lora'"):
        tiny_module(BayesianFineTuning, trainable="attention")
    with pytest.raises(ValueError, match="kl_form"):
        tiny_module(BayesianFineTuning, kl_form="reverse")
    with pytest.raises(ValueError, match="bayesian_include"):
        tiny_module(BayesianFineTuning, trainable="lora", bayesian_include=["*"])


def test_full_bnn_export_is_the_plain_base_with_the_means(tmp_path):
    torch.manual_seed(0)
    base = dict(tiny_module().denoiser.named_parameters())
    module = tiny_module(BayesianFineTuning)
    _move_off_init(module)
    expected = module.generate(prompts=PROMPTS, seeds=[3, 4], steps=3, guidance_scale=2.0)
    assert torch.equal(expected, module.generate(prompts=PROMPTS, seeds=[3, 4], steps=3, guidance_scale=2.0))
    assert module.training  # generate restored the mode

    module.save_pretrained(tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export")
    exported = dict(pipe.unet.named_parameters())
    assert exported.keys() == base.keys()  # no weight_mu / weight_sigma: exactly the base architecture
    assert sum(p.numel() for p in exported.values()) == sum(p.numel() for p in base.values())
    means = {}
    for name, p in module.denoiser.named_parameters():
        if not name.endswith("_sigma"):
            means[name.replace("weight_mu", "weight").replace("bias_mu", "bias")] = p
    assert means.keys() == exported.keys()
    assert all(torch.equal(exported[n], means[n]) for n in exported)
    got = _pipeline_images(pipe, [3, 4], 3, 2.0)
    assert torch.equal(got, expected)
    _assert_still_bayesian(module, 24)


def test_bnn_lora_export_merged_and_lora_only(tmp_path):
    torch.manual_seed(0)
    module = tiny_module(BayesianFineTuning, trainable="lora", lora_rank=2)
    _move_off_init(module)
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], steps=2, guidance_scale=1.5)
    assert torch.equal(expected, module.generate(prompts=PROMPTS, seeds=[0, 1], steps=2, guidance_scale=1.5))

    module.save_pretrained(tmp_path / "merged")
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    torch.manual_seed(0)
    base = tiny_module()  # same seed -> the base weights the LoRA module started from
    assert sum(p.numel() for p in merged.unet.parameters()) == sum(p.numel() for p in base.denoiser.parameters())
    assert dict(merged.unet.named_parameters()).keys() == dict(base.denoiser.named_parameters()).keys()
    assert torch.allclose(_pipeline_images(merged, [0, 1], 2, 1.5), expected, atol=1e-4)

    module.save_pretrained(tmp_path / "lora", lora_only=True)
    base.save_pretrained(tmp_path / "base")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(tmp_path / "lora")
    assert torch.allclose(_pipeline_images(pipe, [0, 1], 2, 1.5), expected, atol=1e-4)
    _assert_still_bayesian(module, 32)


def test_kl_off_is_computed_only_on_the_steps_the_trainer_logs(subject_dir, tmp_path):
    import csv

    from conftest import quiet_trainer
    from lightning.pytorch.loggers import CSVLogger

    from lightning_ft.data import LimitedDataModule

    module = tiny_module(BayesianFineTuning, lr=1e-3)
    calls = []
    original = module.kl
    module.kl = lambda: calls.append(module.global_step) or original()
    data = LimitedDataModule(str(subject_dir), instance_prompt="a sks star", resolution=32, batch_size=2, repeats=4)
    logger = CSVLogger(tmp_path, name="kl")
    quiet_trainer(max_steps=6, log_every_n_steps=3, logger=logger, limit_val_batches=0).fit(module, data)
    assert calls == [2, 5]  # the 3rd and 6th steps, as Lightning writes logs
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss/kl")]
    assert [int(r["step"]) for r in rows] == [2, 5] and all(float(r["train/loss/kl"]) > 0 for r in rows)
    # With the KL on, it is part of every step's loss.
    module.hparams.kl_weight, calls[:] = 1e-6, []
    quiet_trainer(max_steps=9, log_every_n_steps=3, limit_val_batches=0).fit(module, data)
    assert calls == list(range(9))
