"""Metric backbones (DINO v1/v2, CLIP, factories), CLIP-T and model-folder declarations, on tiny random checkpoints
written with save_pretrained: nothing is downloaded."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lightning_ft.core.tokenizer import build_word_tokenizer  # noqa: E402
from lightning_ft.embedded import shapes  # noqa: E402
from lightning_ft.metrics import (  # noqa: E402
    CLIPTextScore,
    FeatureExtractor,
    as_backbone,
    backbone_spec,
    declared_backbones,
    make_backbone,
    resolve_backbone,
    subject_fidelity,
)
from lightning_ft.metrics.backbones import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    DECLARATION,
    DEFAULT_CHECKPOINTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    model_backbones,
    write_declaration,
)

SIZE = 32  # the tiny models' image size; test images are 48x48, so every backbone resizes them
TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE, patch_size=8)


def images(count: int = 4, seed: int = 0, size: int = 48) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def by_hand(x: torch.Tensor, mean, std) -> torch.Tensor:
    """What the backbones are meant to feed their model: antialiased bicubic resize, then normalisation."""
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def with_preprocessor(folder, mean, std):
    file = folder / "preprocessor_config.json"
    config = json.loads(file.read_text()) if file.exists() else {}
    file.write_text(json.dumps({**config, "image_mean": list(mean), "image_std": list(std)}))
    return folder


# ------------------------------------------------------------------------------------ tiny checkpoints
@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """A DINO v1-like checkpoint: a plain ViT saved without its pooler (as facebook/dino-vits16 is)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dino")
    ViTModel(ViTConfig(intermediate_size=37, **TINY_VISION), add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(Dinov2Config(mlp_ratio=2, **TINY_VISION)).save_pretrained(folder)
    # DINOv2's processor crops to 224 whatever its position table allows; this tiny one says its own crop.
    (folder / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": SIZE, "width": SIZE}}))
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(shapes.vocabulary(), model_max_length=16)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, tokenizer):
    """A full CLIPModel (vision and text towers) and its word-level tokenizer, as CLIP checkpoints are shipped."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=16,
        # CLIP's text embedding is the hidden state at the first <eos>: the config must know the tokenizer's id.
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(intermediate_size=37, **TINY_VISION)
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_t(clip_folder):
    return CLIPTextScore(clip_folder, batch_size=2)


# ------------------------------------------------------------------------------------ DINO v1 / v2
def test_dino_is_the_cls_token_of_the_vit_on_imagenet_normalised_pixels(vit_folder):
    from transformers import ViTModel

    backbone = make_backbone("dino", vit_folder)
    x = images()
    feats = backbone.extract(x)
    assert isinstance(backbone, FeatureExtractor) and backbone.name == "dino" and backbone.num_features == 32
    model = ViTModel.from_pretrained(vit_folder).eval()
    with torch.no_grad():
        expected = model(pixel_values=by_hand(x, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
    assert feats.shape == (4, 32) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-4)
    # uint8 images are the same images; batching does not change features.
    as_uint8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(backbone(as_uint8), backbone(as_uint8.float() / 255), atol=1e-6, rtol=0)
    torch.testing.assert_close(backbone.extract(x, batch_size=3), feats, atol=1e-5, rtol=1e-4)
    # Frozen, and stays in eval mode when a parent module is put in training mode.
    assert not any(p.requires_grad for p in backbone.parameters())
    nn.Sequential(backbone).train()
    assert not backbone.training and not backbone.module.model.training
    assert backbone.extract(x[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        backbone(x * 2 - 1)


def test_dinov2_is_the_cls_token_of_the_dinov2_model(dinov2_folder):
    from transformers import Dinov2Model

    backbone = make_backbone("dinov2", dinov2_folder)
    x = images(3, seed=1)
    model = Dinov2Model.from_pretrained(dinov2_folder).eval()
    with torch.no_grad():
        out = model(pixel_values=by_hand(x, IMAGENET_MEAN, IMAGENET_STD))
    assert backbone.name == "dinov2" and backbone.num_features == 32
    torch.testing.assert_close(backbone.extract(x), out.last_hidden_state[:, 0], atol=1e-5, rtol=1e-4)
    # The CLS token, not a mean of the patch tokens.
    assert not torch.allclose(backbone.extract(x), out.last_hidden_state[:, 1:].mean(1), atol=1e-3)


def test_dinov2_scores_at_its_processors_crop_not_its_position_table(dinov2_folder, tmp_path):
    """facebook/dinov2-* configs say image_size 518 but their processor feeds 224 crops: without a crop_size the
    backbone feeds 224, with one it feeds that."""
    import shutil

    assert make_backbone("dinov2", dinov2_folder).module.preprocess.image_size == SIZE
    bare = shutil.copytree(dinov2_folder, tmp_path / "bare")
    (bare / "preprocessor_config.json").unlink()
    assert make_backbone("dinov2", bare).module.preprocess.image_size == 224


@pytest.mark.parametrize("name", ["dino", "dinov2", "clip"])
def test_a_folders_preprocessor_config_sets_the_normalisation(name, vit_folder, dinov2_folder, clip_folder, tmp_path):
    import shutil

    source = {"dino": vit_folder, "dinov2": dinov2_folder, "clip": clip_folder}[name]
    default = (IMAGENET_MEAN, IMAGENET_STD) if name != "clip" else (CLIP_MEAN, CLIP_STD)
    folder = shutil.copytree(source, tmp_path / name)
    x = images(2, seed=3)
    plain = make_backbone(name, folder)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    custom = make_backbone(name, with_preprocessor(folder, mean, std))
    torch.testing.assert_close(plain.module.preprocess(x), by_hand(x, *default), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(custom.module.preprocess(x), by_hand(x, mean, std), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain.extract(x), custom.extract(x), atol=1e-3)


# ------------------------------------------------------------------------------------ CLIP
def test_clip_backbone_is_the_projected_image_embedding(clip_folder, tmp_path):
    from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    x = images(3, seed=4)
    # From a full CLIPModel folder (what CLIP checkpoints are): its visual projection of the pooled output.
    backbone = make_backbone("clip", clip_folder)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    pixels = by_hand(x, CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        expected = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        normalised = model(pixel_values=pixels, input_ids=torch.tensor([[2, 3]])).image_embeds
    assert backbone.name == "clip" and backbone.num_features == 16
    torch.testing.assert_close(backbone.extract(x), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(F.normalize(backbone.extract(x), dim=-1), normalised, atol=1e-5, rtol=1e-4)
    # From a vision-only folder: its image_embeds.
    config = CLIPVisionConfig(intermediate_size=37, projection_dim=8, **TINY_VISION)
    vision = CLIPVisionModelWithProjection(config).eval()
    vision.save_pretrained(tmp_path / "vision")
    with torch.no_grad():
        embeds = vision(pixel_values=pixels).image_embeds
    vision_backbone = make_backbone("clip", tmp_path / "vision")
    assert vision_backbone.num_features == 8
    torch.testing.assert_close(vision_backbone.extract(x), embeds, atol=1e-5, rtol=1e-4)
    # Identical images are identical to the backbone.
    assert subject_fidelity(x[:1], x[:1].clone(), backbone) == pytest.approx(1.0, abs=1e-5)


def test_clip_t_is_the_cosine_of_each_image_with_its_own_prompt(clip_t, clip_folder, tokenizer):
    from transformers import CLIPModel

    x = images(4, seed=5)
    prompts = ["a red star", "a blue circle on a gray background", "a ring", "a white cross on a navy background"]
    shuffled = prompts[1:] + prompts[:1]
    model = CLIPModel.from_pretrained(clip_folder).eval()
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=by_hand(x, CLIP_MEAN, CLIP_STD), **tokens)
    cosines = out.image_embeds @ out.text_embeds.T  # (image, prompt), both unit vectors
    matched = clip_t.scores(x, prompts)
    torch.testing.assert_close(matched, cosines.diagonal(), atol=1e-5, rtol=1e-4)
    # Image i against prompt i+1: the pairing follows the lists, whatever the batch and padding.
    torch.testing.assert_close(clip_t.scores(x, shuffled), cosines.roll(-1, dims=1).diagonal(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(clip_t.scores(x, shuffled), matched, atol=1e-3)
    result = clip_t(x, prompts)
    assert result["n"] == 4 and result["clip_t"] == pytest.approx(float(cosines.diagonal().mean()), abs=1e-5)
    assert clip_t(x, shuffled)["clip_t"] != pytest.approx(result["clip_t"], abs=1e-4)
    # Its image embedding is the clip backbone's, normalised; the same image twice has cosine 1.
    backbone_embeds = F.normalize(make_backbone("clip", clip_folder).extract(x), dim=-1)
    torch.testing.assert_close(clip_t.image_embeddings(x), backbone_embeds, atol=1e-5, rtol=0)
    same = clip_t.image_embeddings(torch.cat([x[:1], x[:1]]))
    assert float(same[0] @ same[1]) == pytest.approx(1.0, abs=1e-5)


def test_clip_t_batches_truncates_and_checks_its_inputs(clip_t):
    x = images(3, seed=6)
    prompts = ["a star", " ".join(["a red star on a navy background"] * 6), "a gray ring"]  # the 2nd: 43 tokens > 16
    one_by_one = torch.cat([clip_t.scores(x[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(clip_t.scores(x, prompts), one_by_one, atol=1e-5, rtol=1e-4)
    assert bool((clip_t.scores(x, prompts).abs() <= 1 + 1e-5).all())
    empty = clip_t(x[:0], [])
    assert empty["n"] == 0 and empty["clip_t"] != empty["clip_t"]  # NaN
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        clip_t(x, prompts[:2])
    with pytest.raises(TypeError, match="list of strings"):
        clip_t(x[:1], "a star")


def test_clip_t_needs_a_text_tower_and_a_tokenizer(clip_folder, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(intermediate_size=37, **TINY_VISION)).save_pretrained(tmp_path)
    # A vision-only folder lacks the text tower: an error, not a randomly initialised text encoder.
    with pytest.raises(OSError, match=rf"could not load the clip \(CLIP-T\) backbone from '{tmp_path}'"):
        CLIPTextScore(tmp_path)
    with pytest.raises(OSError, match="openai/clip-vit-large-patch14"):
        CLIPTextScore()


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", ["dino", "dinov2", "clip"])
def test_a_hub_id_offline_is_an_error_naming_the_backbone_and_the_path(name):
    with pytest.raises(OSError, match=rf"{name} backbone from '{DEFAULT_CHECKPOINTS[name]}'"):
        make_backbone(name)
    with pytest.raises(OSError, match=rf"(?s){name} backbone from 'someone/not-on-this-machine'.*local folder"):
        make_backbone(name, "someone/not-on-this-machine")


def test_a_folder_of_another_model_type_is_an_error_not_random_weights(vit_folder, dinov2_folder):
    with pytest.raises(OSError, match=r"dinov2 backbone from .*no weights for \d+ parameters"):
        make_backbone("dinov2", vit_folder)
    with pytest.raises(OSError, match=r"clip backbone from .*another model type"):
        make_backbone("clip", dinov2_folder)


def test_unknown_names_and_bad_factories(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        make_backbone("nope")
    with pytest.raises(ValueError, match="cannot import 'missing'"):
        make_backbone("lightning_ft.metrics.backbones:missing")
    with pytest.raises(ValueError, match="cannot import"):
        make_backbone("no_such_package_here.module:factory")
    # str(path) is not a FeatureExtractor.
    with pytest.raises(TypeError, match="'builtins:str' returned str, not a FeatureExtractor"):
        make_backbone("builtins:str")
    # A factory gets the path as a string and its extractor is returned as is.
    seen = []

    def factory(path):
        seen.append(path)
        return FeatureExtractor(nn.Flatten(), 3 * 4 * 4, "flat")

    monkeypatch.setitem(sys.modules, "my_backbones", types.SimpleNamespace(flat=factory))
    backbone = make_backbone("my_backbones:flat", tmp_path)
    assert seen == [str(tmp_path)] and backbone.name == "flat"
    assert backbone(torch.ones(2, 3, 4, 4)).shape == (2, 48)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_says_what_to_install():
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        make_backbone("inception")


def test_as_backbone():
    flat = FeatureExtractor(nn.Flatten(), 48, "flat")
    assert as_backbone(flat) is flat
    module = nn.Flatten()
    module.num_features = 48
    wrapped = as_backbone(module)
    assert isinstance(wrapped, FeatureExtractor) and wrapped.num_features == 48 and wrapped.name == "Flatten"
    with pytest.raises(TypeError, match="num_features"):
        as_backbone(nn.Flatten())
    with pytest.raises(ValueError, match="unknown backbone"):
        as_backbone("nope")


# ------------------------------------------------------------------------------------ declarations
def declare(folder, backbones: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DECLARATION).write_text(json.dumps({"backbones": backbones}))
    return folder


def test_declared_backbones(tmp_path):
    folder = declare(tmp_path / "model", {"identity": {"name": "pkg.mod:fn", "path": "weights"}})
    assert declared_backbones(folder) == {"identity": {"name": "pkg.mod:fn", "path": "weights"}}
    assert declared_backbones(str(folder)) == declared_backbones(folder)
    assert declared_backbones(tmp_path / "missing") == {}
    assert declared_backbones(tmp_path) == {}  # a folder without the file
    assert declared_backbones("facebook/dino-vits16") == {}  # a hub id
    assert declared_backbones(None) == {}
    bad = declare(tmp_path / "bad", {"identity": {"name": "dino"}, "style": {"name": "clip"}})
    with pytest.raises(ValueError, match=rf"{DECLARATION}: unknown backbone roles \['style'\]"):
        declared_backbones(bad)
    (bad / DECLARATION).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{DECLARATION}: not valid JSON"):
        declared_backbones(bad)


def test_backbone_spec(tmp_path):
    bare = declared_backbones(tmp_path / "bare")
    assert backbone_spec("identity", declared=bare) == ("dino", None)
    assert backbone_spec("fid", declared=bare) == ("inception", None)
    assert backbone_spec("prompt") == ("clip", None)
    assert backbone_spec("identity", path="local/dino", declared=bare) == ("dino", "local/dino")
    declared = declared_backbones(declare(tmp_path / "model", {"identity": {"name": "pkg.mod:fn", "path": "weights"}}))
    assert backbone_spec("identity", declared=declared) == ("pkg.mod:fn", "weights")
    assert backbone_spec("identity", path="other", declared=declared) == ("pkg.mod:fn", "other")
    # A role the model does not declare takes the paper default; a given name overrides the declaration.
    assert backbone_spec("fid", declared=declared) == ("inception", None)
    assert backbone_spec("identity", "dinov2", declared=declared) == ("dinov2", None)
    assert backbone_spec("identity", "clip", "x", declared=declared) == ("clip", "x")
    with pytest.raises(ValueError, match="unknown backbone role 'style'"):
        backbone_spec("style", declared=declared)


def test_resolve_backbone_builds_what_a_folder_declares(tmp_path, vit_folder):
    folder = declare(tmp_path / "model", {"identity": {"name": "dino", "path": str(vit_folder)}})
    backbone = resolve_backbone("identity", declared=declared_backbones(folder))
    x = images(2, seed=7)
    assert backbone.name == "dino"
    torch.testing.assert_close(backbone.extract(x), make_backbone("dino", vit_folder).extract(x), atol=0, rtol=0)


def test_a_model_declares_its_backbones_by_argument_or_by_its_folder(tmp_path):
    """``model_backbones``: the module's own ``backbones`` argument wins over its pretrained folder's file; a
    declaration without a name, or of an unknown role, is refused naming where it came from."""
    from types import SimpleNamespace

    folder = declare(tmp_path / "model", {"fid": {"name": "pkg.mod:features"}})
    assert model_backbones(SimpleNamespace(hparams={"pretrained": str(folder)})) == {
        "fid": {"name": "pkg.mod:features"}
    }
    own = {"identity": {"name": "dinov2", "path": "/models/dinov2"}}
    assert model_backbones(SimpleNamespace(hparams={"pretrained": str(folder), "backbones": own})) == own
    assert model_backbones(SimpleNamespace(hparams={"pretrained": "facebook/some-model"})) == {}
    with pytest.raises(ValueError, match=r"model.backbones: backbone role 'identity' needs a 'name'"):
        model_backbones(SimpleNamespace(hparams={"backbones": {"identity": {"path": "x"}}}))
    with pytest.raises(ValueError, match=r"model.backbones: unknown backbone roles \['style'\]"):
        model_backbones(SimpleNamespace(hparams={"backbones": {"style": {"name": "clip"}}}))


def test_write_declaration(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    write_declaration({"fid": {"name": "pkg.mod:features"}}, export)
    assert declared_backbones(export) == {"fid": {"name": "pkg.mod:features"}}
    other = tmp_path / "other"
    other.mkdir()
    write_declaration({}, other)  # nothing declared: nothing written
    assert not (other / DECLARATION).exists()
