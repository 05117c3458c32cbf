"""The shipped embedded model loads with plain diffusers/transformers and samples on CPU."""

from __future__ import annotations

import json

import torch
from diffusers import DiffusionPipeline
from transformers import AutoTokenizer

from lightning_ft.embedded import asset_path
from lightning_ft.embedded.shapes import RESERVED_TOKENS


def test_text_to_image_asset_loads_with_plain_diffusers_and_generates():
    folder = asset_path("shapes-t2i")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = pipe(["a red circle on a black background"] * 2, num_inference_steps=3, guidance_scale=2.0,
               generator=generators, output_type="pt").images  # fmt: skip
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 25 * 2**20, f"the shipped model is {size / 2**20:.1f} MB"
    assert (folder / "README.md").exists()


def test_asset_tokenizer_loads_with_autotokenizer_and_keeps_reserved_tokens():
    tokenizer = AutoTokenizer.from_pretrained(asset_path("shapes-t2i") / "tokenizer")
    for token in RESERVED_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
    ids = tokenizer("a sks star on a gray background").input_ids
    assert tokenizer.unk_token_id not in ids
    config = json.loads((asset_path("shapes-t2i") / "text_encoder" / "config.json").read_text())
    assert tokenizer.model_max_length <= config["max_position_embeddings"]


def test_dit_asset_loads_with_plain_diffusers_and_samples_its_classes():
    from lightning_ft.core import DiffusionBase

    folder = asset_path("shapes-dit")
    assert type(DiffusionPipeline.from_pretrained(folder)).__name__ == "DiTPipeline"
    module = DiffusionBase(pretrained=str(folder), sample_steps=3, guidance_scale=2.0)
    assert module.family.needs_labels() and module.null_class == 48
    out = module.generate(labels=[0, 27], seeds=[0, 0])  # same noise, two classes
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all() and not torch.equal(out[0], out[1])
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20 * 2**20 and (folder / "README.md").exists()
