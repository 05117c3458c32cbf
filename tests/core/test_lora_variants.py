"""``model.lora_variant`` (LoRA, DoRA, LoHa, LoKr, OFT through PEFT) on SD1.x and SD3: only the variant's weights
train, the merged export and the LoRA-only export reproduce the module, a checkpoint resumes to the same weights;
BNN on LoRA and OFT; refused pairs name the variant and the method."""

from __future__ import annotations

import contextlib
import functools
import json

import pytest
import torch
from conftest import perturb, tiny_module, train_steps
from diffusers import DiffusionPipeline
from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftConfig
from peft.tuners.oft.layer import OFTRotationModule
from peft.tuners.tuners_utils import BaseTunerLayer

from lightning_ft.core.trainable import LORA_VARIANTS, adapter_config, has_lora, lora_variant_of
from lightning_ft.methods import BayesianFineTuning
from lightning_ft.methods.a3fta import AdapterAttentionFineTuning
from lightning_ft.nn.bayesian import BayesianOFTRotation, bayesian_layers

MODELS = ("tiny_t2i", "tiny_sd3")
#: The PEFT parameter names of each variant: every trainable weight carries one, and each one appears.
MARKERS = {
    "lora": {"lora_A", "lora_B"},
    "dora": {"lora_A", "lora_B", "lora_magnitude_vector"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "lokr": {"lokr_w1", "lokr_w2"},
    "oft": {"oft_R"},
}
PROMPTS = ["a sks star on a gray background", "a red circle"]
SEEDS = [11, 12]
BATCH = {"pixel_values": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
         "prompts": ["a sks star", "a red circle on a navy background"]}  # fmt: skip


def build(model: str, variant: str, cls=None, **kwargs):
    """The method on the tiny model, base weights seeded: every build of one model has the same pretrained base."""
    torch.manual_seed(0)
    return tiny_module(cls, model=model, trainable="lora", lora_variant=variant, lr=1e-2, **kwargs)


def base_model(model: str):
    """The same pretrained base without an adapter (for loading exports onto)."""
    torch.manual_seed(0)
    return tiny_module(model=model, trainable="none")


@contextlib.contextmanager
def adapters_off(denoiser):
    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def probe(module):
    """Fixed noisy latents, timesteps and condition of ``module``'s model."""
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 16, 16, generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        t = module.sample_timesteps(2)
    return noisy, t, module.encode_prompts(PROMPTS)


@torch.no_grad()
def prediction(module, denoiser=None):
    with module.sampling_weights():
        return module.predict(*probe(module), denoiser=denoiser)


def markers_in(names) -> set[str]:
    found = set()
    for name in names:
        hit = {m for markers in MARKERS.values() for m in markers if f".{m}." in f".{name}."}
        assert hit, f"{name} is not an adapter weight"
        found |= hit
    return found


@functools.cache
def trained(model: str, variant: str) -> dict:
    """A module of ``variant`` trained 2 steps, then moved off its near-identity start (so that the export checks
    compare outputs that differ from the base model's), with what the tests check about it."""
    module = build(model, variant)
    record = {"module": module}
    with adapters_off(module.denoiser):
        record["base"] = prediction(module)
    record["at_init"] = prediction(module)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    train_steps(module, BATCH, 2)
    record["changed"] = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    perturb(module)
    record["prediction"] = prediction(module)
    return record


# --------------------------------------------------------------------------------------------------- settings
def test_settings_map_to_each_variants_peft_config():
    targets = ["to_q", "to_v"]
    lora = adapter_config("lora", 8, None, targets, 0.1)
    assert type(lora) is LoraConfig and not lora.use_dora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 8, 0.1)  # alpha None = rank: scale 1
    assert lora.init_lora_weights == "gaussian" and set(lora.target_modules) == set(targets)
    dora = adapter_config("dora", 4, 16, targets, 0.0)
    assert type(dora) is LoraConfig and dora.use_dora and dora.lora_alpha == 16
    loha = adapter_config("loha", 4, 2, targets, 0.1)
    assert type(loha) is LoHaConfig and (loha.r, loha.alpha, loha.rank_dropout, loha.module_dropout) == (4, 2, 0.1, 0)
    lokr = adapter_config("lokr", 6, None, targets, 0.0)
    assert type(lokr) is LoKrConfig and (lokr.r, lokr.alpha, lokr.decompose_factor) == (6, 6, -1)
    oft = adapter_config("oft", 4, None, targets, 0.0)  # rank = blocks per layer (BNN's --r, kohya's dim)
    assert type(oft) is OFTConfig and (oft.r, oft.oft_block_size, oft.coft) == (4, 0, False)
    for variant in LORA_VARIANTS:
        assert lora_variant_of(adapter_config(variant, 4, None, targets, 0.0)) == variant


def test_refused_settings_and_pairs_name_the_variant_and_the_method():
    with pytest.raises(ValueError, match=r"model.lora_variant='ia3': must be one of"):
        build("tiny_t2i", "ia3")
    with pytest.raises(ValueError, match=r"model.lora_alpha=8.*lora_variant='oft'"):
        build("tiny_t2i", "oft", lora_alpha=8)
    with pytest.raises(ValueError, match=r"model.lora_dropout=0.1.*lora_variant='oft'"):
        build("tiny_t2i", "oft", lora_dropout=0.1)
    # A variant without trainable='lora' trains nothing: named with the method.
    with pytest.raises(ValueError, match=r"model.lora_variant='loha': DreamBooth with model.trainable='full'"):
        tiny_module(trainable="full", lora_variant="loha")
    with pytest.raises(ValueError, match=r"model.lora_variant='oft': AdapterAttentionFineTuning"):
        tiny_module(AdapterAttentionFineTuning, lora_variant="oft")
    # BNN has released Bayesian forms for LoRA and OFT only.
    for variant in ("dora", "loha", "lokr"):
        with pytest.raises(ValueError, match=rf"model.lora_variant='{variant}': BayesianFineTuning"):
            build("tiny_t2i", variant, BayesianFineTuning)


# ------------------------------------------------------------------------------------------- train and export
@pytest.mark.parametrize("variant", LORA_VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_variant_trains_only_its_own_weights_from_the_identity(model, variant):
    record = trained(model, variant)
    module = record["module"]
    assert lora_variant_of(module.denoiser.peft_config["default"]) == variant
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert markers_in(trainable) == MARKERS[variant]
    torch.testing.assert_close(record["at_init"], record["base"], rtol=0, atol=1e-6)  # unchanged at step 0
    assert record["changed"] and record["changed"] <= trainable
    assert (record["prediction"] - record["base"]).abs().max() > 1e-3  # the export checks below are not trivial


@pytest.mark.parametrize("variant", LORA_VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_merged_export_is_the_plain_pipeline_of_the_module(model, variant, tmp_path):
    record = trained(model, variant)
    module = record["module"]
    module.save_pretrained(tmp_path / "full")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "full")
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, module.family.denoiser_argument)
    assert type(denoiser) is type(module.denoiser) and not has_lora(denoiser)
    torch.testing.assert_close(prediction(module, denoiser), record["prediction"], rtol=0, atol=2e-5)
    inputs = module.family.sample_inputs(PROMPTS)
    expected = module.generate(PROMPTS, seeds=SEEDS)
    got = module.family.sample(module, pipe, inputs, SEEDS, module.hparams.sample_steps, module.hparams.guidance_scale)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)
    assert has_lora(module.denoiser)  # the module keeps training after an export


@pytest.mark.parametrize("variant", LORA_VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_lora_only_export_loads_back_with_the_familys_loader(model, variant, tmp_path):
    record = trained(model, variant)
    module = record["module"]
    folder = module.save_pretrained(tmp_path / "lora", lora_only=True)
    fresh = base_model(model)
    if variant in ("lora", "dora"):
        # diffusers' own file, read by the pipeline's load_lora_weights (alpha and DoRA from its metadata).
        assert (folder / "pytorch_lora_weights.safetensors").is_file() and not (folder / "adapter_config.json").exists()
        fresh.build_pipeline().load_lora_weights(str(folder))
    else:
        # No diffusers loader: PEFT's adapter folder, said so in lightning_ft.json.
        config = PeftConfig.from_pretrained(str(folder))
        assert lora_variant_of(config) == variant
        record_json = json.loads((folder / "lightning_ft.json").read_text())["lora"]
        assert record_json["format"] == "peft" and record_json["variant"] == variant
        assert "load_peft_lora" in record_json["loader"]
        fresh.family.load_lora(fresh.denoiser, folder)
    (config,) = fresh.denoiser.peft_config.values()  # load_lora_weights names its adapter itself
    assert lora_variant_of(config) == variant
    torch.testing.assert_close(prediction(fresh), record["prediction"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", LORA_VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_holds_the_variants_weights_and_resumes_to_them(model, variant):
    module = trained(model, variant)["module"]
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    state = checkpoint["state_dict"]
    assert set(state) == {n for n, p in module.named_parameters() if p.requires_grad}
    assert markers_in(state) == MARKERS[variant]
    fresh = build(model, variant)  # the same base, the adapter re-initialised
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(state, strict=False)  # as Lightning restores it (strict_loading False)
    for (name, a), b in zip(module.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(prediction(fresh), prediction(module))


def test_checkpoint_of_another_variant_is_refused_naming_it():
    module = build("tiny_t2i", "loha")
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"model.lora_variant: 'loha' in the checkpoint, 'lokr' now"):
        build("tiny_t2i", "lokr").on_load_checkpoint(checkpoint)


# --------------------------------------------------------------------------------------------------------- BNN
def test_bayesian_oft_rotation_samples_the_released_generator():
    """R = mu + sigma * eps over the full blocks x b x b matrix; PEFT's rotation gets the skew part 0.5 (R - R^T)."""
    torch.manual_seed(0)
    plain = OFTRotationModule(r=2, n_elements=6, block_size=4, in_features=8)
    torch.nn.init.normal_(plain.weight, std=0.1)
    layer = BayesianOFTRotation(plain, sigma_init=0.05, prior_sigma=0.01)
    assert layer.weight_mu.shape == (2, 4, 4) and layer.num_bayesian == 32  # diagonal included, as released
    torch.testing.assert_close(layer.weight, plain.weight.detach())  # the mean's skew part is PEFT's generator
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected_mean = plain(x)
        torch.testing.assert_close(layer.eval()(x), expected_mean)
        torch.manual_seed(5)
        sampled = layer.train()(x)
        torch.manual_seed(5)
        r = layer.weight_mu + layer.weight_sigma * torch.randn_like(layer.weight_mu)
        reference = layer.to_plain()
        reference.weight.copy_(0.5 * (r - r.transpose(1, 2))[:, layer.rows, layer.cols])
        torch.testing.assert_close(sampled, reference(x))
    assert not torch.allclose(sampled, expected_mean)
    # Released KL: zero when q is the prior (mu 0, sigma = prior sigma), over every element of R.
    fresh = BayesianOFTRotation(OFTRotationModule(2, 6, 4, 8).requires_grad_(True), 0.01, 0.01)
    torch.nn.init.zeros_(fresh.weight_mu)
    assert fresh.kl().item() == 0.0 and layer.kl().item() > 0


@pytest.mark.parametrize("variant", ["lora", "oft"])
def test_bnn_on_lora_and_oft_trains_the_released_bayesian_weights_and_exports_their_means(variant, tmp_path):
    module = build("tiny_t2i", variant, BayesianFineTuning)
    layers = bayesian_layers(module.denoiser)
    adapted = [n for n, m in module.denoiser.named_modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) == len(adapted) > 0
    if variant == "oft":
        # Every OFT generator, full R of zeros (identity rotation) with sigma_init, the rest of the model frozen.
        assert all(isinstance(m, BayesianOFTRotation) and n.endswith(".oft_R.default") for n, m in layers.items())
        assert all(torch.equal(m.weight_mu, torch.zeros_like(m.weight_mu)) for m in layers.values())
        assert all(torch.all(m.weight_sigma == 0.01) for m in layers.values())
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable == {f"denoiser.{n}.{p}" for n in layers for p in ("weight_mu", "weight_sigma")}
    else:
        assert all(n.endswith(".lora_B.default") for n in layers)
    with adapters_off(module.denoiser):
        base = prediction(module)
    torch.testing.assert_close(prediction(module), base, rtol=0, atol=1e-6)  # the means start at the identity

    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    train_steps(module, BATCH, 2)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed <= {n for n, p in module.named_parameters() if p.requires_grad}
    assert any(n.endswith("weight_mu") for n in changed) and any(n.endswith("weight_sigma") for n in changed)
    perturb(module)
    module.train()
    noisy, t, cond = probe(module)
    with torch.no_grad():  # a fresh weight sample per forward in training
        assert not torch.equal(module.predict(noisy, t, cond), module.predict(noisy, t, cond))
    expected = prediction(module)  # the means
    assert (expected - base).abs().max() > 1e-3

    module.save_pretrained(tmp_path / "full")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(prediction(module, pipe.unet), expected, rtol=0, atol=2e-5)
    folder = module.save_pretrained(tmp_path / "lora", lora_only=True)
    fresh = base_model("tiny_t2i")
    fresh.family.load_lora(fresh.denoiser, folder)
    assert not bayesian_layers(fresh.denoiser)  # plain adapter weights: the means, as the released code writes
    torch.testing.assert_close(prediction(fresh), expected, rtol=0, atol=1e-5)
    assert len(bayesian_layers(module.denoiser)) == len(layers)  # the module is still Bayesian after its exports
