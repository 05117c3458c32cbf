"""``python -m lightning_ft.evaluate`` on a tiny exported model: the files and their counts, the defaults (prompts,
references), errors that name the path at fault, scores checked on images whose scores are known, CLIP-I / CLIP-T
with a tiny CLIP, and the run report's evaluation panel."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import perturb, tiny_module, write_images
from PIL import Image

from lightning_ft.callbacks.corruption_monitor import unit_pixels
from lightning_ft.core.base import DiffusionBase
from lightning_ft.data.folder import list_images, load_images
from lightning_ft.evaluate import main
from lightning_ft.evaluation import scoring
from lightning_ft.evaluation.output import GRID_CELL
from lightning_ft.metrics import make_backbone
from lightning_ft.metrics.backbones import DEFAULT_CHECKPOINTS
from lightning_ft.report.evaluation import read_evaluation

IDENTITY = "lightning_ft.embedded.backbones:identity"
PROMPTS = ["a sks star on a gray background", "a red circle on a black background"]
INSTANCE = "a sks star"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(instance_dir, heldout_dir=None, sample_prompts=PROMPTS) -> dict:
    data = {"instance_dir": str(instance_dir), "instance_prompt": INSTANCE, "class_prompt": "a star"}
    if heldout_dir is not None:
        data["heldout_dir"] = str(heldout_dir)
    if sample_prompts is not None:
        data["sample_prompts"] = list(sample_prompts)
    return {"model": {"class_path": "lightning_ft.methods.DreamBooth",
                      "init_args": {"sample_steps": 2, "guidance_scale": 2.0}},
            "data": {"class_path": "lightning_ft.data.LimitedDataModule", "init_args": data}}  # fmt: skip


def make_run(folder, export, **config) -> str:
    """A run folder as a fit leaves it, for what evaluate reads: config.yaml and export/."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(_config(**config)))
    (folder / "export").symlink_to(export, target_is_directory=True)
    return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    export = tiny_module().save_pretrained(root / "export")
    heldout = write_images(root / "heldout", 4, seed=1, captions=True)  # captions: .txt beside, not references
    train = write_images(root / "train", 3, seed=2)
    (root / "prompts.txt").write_text("# the evaluation's prompts\n" + "\n".join(PROMPTS) + "\n\na sks square\n")
    return {"root": root, "export": export, "heldout": heldout, "train": train, "prompts": root / "prompts.txt"}


def _result(out) -> dict:
    return json.loads((out / "evaluation.json").read_text())


def _estimates(result: dict):
    for row in [*result["rows"], result["overall"], result["real_images"]]:
        for metric in ("subject_fidelity", "clip_i", "prompt_fidelity"):
            if row.get(metric) and row[metric]["n"] >= 2:
                yield row[metric]


# ------------------------------------------------------------------------------------------------ the files
def test_an_export_writes_the_table_the_json_and_the_grid_with_their_counts(world, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(world["export"]), "--prompts", str(world["prompts"]), "--images-per-prompt", "2",
            "--references", str(world["heldout"]), "--out", str(out), "--steps", "2"]  # fmt: skip
    assert main(argv) == 0
    result = _result(out)
    prompts = [*PROMPTS, "a sks square"]  # the file's, comments and empty lines skipped
    assert [r["prompt"] for r in result["rows"]] == prompts and result["prompts_from"].startswith("--prompts")
    assert all(r["n"] == 2 and r["subject_fidelity"]["n"] == 2 for r in result["rows"])
    assert result["overall"]["n"] == 6 and result["overall"]["subject_fidelity"]["n"] == 6
    assert len(result["per_sample"]["subject_fidelity"]) == 6
    assert result["real_images"]["n"] == 4 and result["real_images"]["subject_fidelity"]["n"] == 4  # no .txt
    assert result["settings"] | {"device": None} == {
        "images_per_prompt": 2,
        "seeds": [0, 1],
        "steps": 2,
        "guidance_scale": 3.0,
        "resolution": 32,
        "device": None,
    }
    # The embedded world: its identity network, no CLIP, its prompt accuracy in the CLIP-T role.
    assert result["metrics"] == {"subject_fidelity": "subject fidelity (shapes-identity-v5)", "clip_i": None,
                                 "prompt_fidelity": "prompt accuracy"}  # fmt: skip
    assert any("CLIP-I and CLIP-T not scored" in n for n in result["notes"])
    for e in _estimates(result):
        assert e["low"] <= e["mean"] <= e["high"]
    # The overall mean is the mean of the per-prompt means (equal counts).
    means = [r["subject_fidelity"]["mean"] for r in result["rows"]]
    assert result["overall"]["subject_fidelity"]["mean"] == pytest.approx(sum(means) / 3)
    table = (out / "evaluation.md").read_text()
    assert "| prompt | n | subject fidelity (shapes-identity-v5) [95% CI] | prompt accuracy [95% CI] |" in table
    assert all(f"| {p} | 2 |" in table for p in prompts) and "| overall | 6 |" in table
    assert "| real images (leave-one-out) | 4 |" in table and "python -m lightning_ft.evaluate" in table
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * GRID_CELL and grid.height > 3 * GRID_CELL  # 3 labelled rows of 2 samples
    printed = capsys.readouterr().out
    assert "overall" in printed and str(out / "evaluation.json") in printed


def test_a_run_folder_uses_its_data_config_and_its_report_gets_the_panel(world, tmp_path, capsys):
    run = make_run(tmp_path / "run", world["export"], instance_dir=world["train"], heldout_dir=world["heldout"])
    assert main([run, "--images-per-prompt", "2"]) == 0
    out = tmp_path / "run" / "evaluation"
    result = _result(out)
    assert [r["prompt"] for r in result["rows"]] == PROMPTS and "data.sample_prompts" in result["prompts_from"]
    assert result["references"]["key"] == "data.heldout_dir" and result["references"]["n"] == 4
    assert result["settings"]["steps"] == 2 and result["settings"]["guidance_scale"] == 2.0  # the run's
    # The real images' prompt fidelity is scored against the instance prompt.
    assert result["real_images"]["prompt_fidelity"]["n"] == 4 and any(INSTANCE in n for n in result["notes"])
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Evaluation (DreamBench-style)" in page and "real images (leave-one-out)" in page
    assert all(p in page for p in PROMPTS) and (tmp_path / "run" / "report" / "evaluation.png").exists()
    evaluation, grid = read_evaluation(tmp_path / "run")
    assert evaluation["overall"] == result["overall"] and grid == out / "grid.png"
    assert "report" in capsys.readouterr().out


def test_references_default_to_the_training_images_and_prompts_to_the_instance_prompt(world, tmp_path, capsys):
    run = make_run(tmp_path / "run", world["export"], instance_dir=world["train"], sample_prompts=None)
    assert main([run, "--seeds", "3", "--no-report"]) == 0
    result = _result(tmp_path / "run" / "evaluation")
    assert [r["prompt"] for r in result["rows"]] == [INSTANCE] and "data.instance_prompt" in result["prompts_from"]
    assert result["settings"]["seeds"] == [3] and result["rows"][0]["n"] == 1
    assert result["references"]["key"] == "data.instance_dir" and result["real_images"]["n"] == 3
    assert "references: the training images" in capsys.readouterr().out
    assert not (tmp_path / "run" / "report.html").exists()  # --no-report


# ----------------------------------------------------------------------------------------------- bad inputs
def test_bad_paths_fail_naming_the_path(world, tmp_path, capsys):
    def error(argv) -> str:
        assert main([str(a) for a in argv]) == 2
        return capsys.readouterr().err

    missing = tmp_path / "nowhere"
    assert str(missing) in error([missing])
    (tmp_path / "empty").mkdir()
    assert "neither a run folder" in error([tmp_path / "empty"])
    gone = tmp_path / "gone_heldout"
    run = make_run(tmp_path / "run", world["export"], instance_dir=world["train"], heldout_dir=gone)
    message = error([run])
    assert "data.heldout_dir" in message and str(gone) in message and "config.yaml" in message
    assert "no_prompts.txt" in error([world["export"], "--prompts", tmp_path / "no_prompts.txt"])
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    assert "holds no prompt" in error([world["export"], "--prompts", tmp_path / "blank.txt"])
    assert "--references" in error([world["export"], "--prompts", world["prompts"], "--references", missing])
    assert "no prompts" in error([world["export"], "--references", world["heldout"]])  # an export alone
    assert "2 --seeds" in error([run, "--images-per-prompt", "4", "--seeds", "0", "1"])
    (tmp_path / "norun").mkdir()
    (tmp_path / "norun" / "config.yaml").write_text(yaml.safe_dump(_config(world["train"])))
    assert "export" in error([tmp_path / "norun"])


# ------------------------------------------------------------------------------------- scores of known images
@pytest.fixture
def references_as_samples(world, monkeypatch):
    """The model "draws" the references themselves, in order: scores that can be computed by hand."""
    pixels = unit_pixels(load_images(list_images(world["heldout"], "test"), "test"), 32)

    def generate(self, prompts=None, seeds=None, **kwargs):
        assert len(prompts) == len(pixels)
        return pixels.clone()

    monkeypatch.setattr(DiffusionBase, "generate", generate)
    return pixels


def test_samples_equal_to_the_references_score_as_computed_by_hand(world, tmp_path, references_as_samples):
    from lightning_ft.embedded.prompts import prompt_accuracy

    pixels = references_as_samples
    captions = [f.with_suffix(".txt").read_text() for f in list_images(world["heldout"], "test")]
    (tmp_path / "p.txt").write_text(f"{captions[0]}\n{captions[2]}\n")
    out = tmp_path / "out"
    argv = [str(world["export"]), "--prompts", str(tmp_path / "p.txt"), "--images-per-prompt", "2",
            "--references", str(world["heldout"]), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = _result(out)
    feats = torch.nn.functional.normalize(make_backbone(IDENTITY).extract(pixels), dim=-1)
    sim = feats @ feats.T
    # Each sample against every reference (itself included: a copy), DreamBooth's DINO ...
    per_sample = torch.tensor(result["per_sample"]["subject_fidelity"])
    torch.testing.assert_close(per_sample, sim.mean(dim=1), atol=1e-5, rtol=0)
    assert result["rows"][1]["subject_fidelity"]["mean"] == pytest.approx(float(sim[2:].mean()), abs=1e-5)
    # ... and the real-images row: each reference against the 3 others, never itself.
    loo = (sim.sum(dim=1) - 1) / 3
    assert result["real_images"]["subject_fidelity"]["mean"] == pytest.approx(float(loo.mean()), abs=1e-5)
    # Copies of the references beat the leave-one-out ceiling by exactly the self-similarity they include.
    assert result["overall"]["subject_fidelity"]["mean"] == pytest.approx((1 + 3 * float(loo.mean())) / 4, abs=1e-5)
    # Prompt accuracy: per sample, the share of its prompt's attributes the feature network sees.
    prompts = [captions[0]] * 2 + [captions[2]] * 2
    expected = []
    for i, prompt in enumerate(prompts):
        scores = prompt_accuracy(pixels[i : i + 1], [prompt])
        named = [v for k, v in scores.items() if not k.startswith("n_") and v == v]
        expected.append(sum(named) / len(named))
    assert result["per_sample"]["prompt_fidelity"] == pytest.approx(expected)
    # References 0 and 2 drawn for their own captions: the network sees all of what the caption names.
    assert result["per_sample"]["prompt_fidelity"][0] == result["per_sample"]["prompt_fidelity"][2] == 1.0


# ----------------------------------------------------------------------------------------------- CLIP models
@pytest.fixture(scope="module")
def clip_and_dino(tmp_path_factory):
    """A tiny full CLIP model with its tokenizer and a tiny DINO-like ViT, written as their checkpoints are."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from lightning_ft.core.tokenizer import build_word_tokenizer
    from lightning_ft.embedded import shapes

    tokenizer = build_word_tokenizer(shapes.vocabulary(), model_max_length=16)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8,
                  intermediate_size=37)  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=len(tokenizer), max_position_embeddings=16, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(3)
    clip = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    dino = tmp_path_factory.mktemp("dino")
    ViTModel(ViTConfig(**vision), add_pooling_layer=False).save_pretrained(dino)
    return clip, dino


def test_clip_i_and_clip_t_with_a_clip_model(world, tmp_path, clip_and_dino, references_as_samples):
    from lightning_ft.metrics import CLIPTextScore

    clip, dino = clip_and_dino
    out = tmp_path / "out"
    argv = [str(world["export"]), "--prompts", str(world["prompts"]), "--seeds", "0", "--references",
            str(world["heldout"]), "--out", str(out), "--backbone", "dino", "--backbone-path", str(dino),
            "--clip", str(clip)]  # fmt: skip
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS * 2))  # 4 prompts x 1 image: the 4 references
    argv[2] = str(tmp_path / "p.txt")
    assert main(argv) == 0
    result = _result(out)
    assert result["metrics"] == {"subject_fidelity": "subject fidelity (dino)", "clip_i": "CLIP-I",
                                 "prompt_fidelity": "CLIP-T"}  # fmt: skip
    assert "given with --backbone" in result["backbones"]["subject_fidelity"]
    assert str(clip) in result["backbones"]["clip"]
    scorer = CLIPTextScore(clip)
    pixels = references_as_samples
    embeds = scorer.image_embeddings(pixels)
    torch.testing.assert_close(torch.tensor(result["per_sample"]["clip_i"]), (embeds @ embeds.T).mean(1),
                               atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(torch.tensor(result["per_sample"]["prompt_fidelity"]),
                               scorer.scores(pixels, PROMPTS * 2), atol=1e-5, rtol=0)  # fmt: skip
    assert result["real_images"]["clip_i"]["n"] == 4
    assert "CLIP-I [95% CI]" in (out / "evaluation.md").read_text()


def test_a_model_that_declares_nothing_is_scored_with_the_papers_backbones(monkeypatch):
    made = {}
    monkeypatch.setattr(scoring, "make_backbone", lambda name, path, device: made.setdefault("identity", (name, path))
                        and make_backbone(IDENTITY))  # fmt: skip
    monkeypatch.setattr(scoring, "CLIPTextScore", lambda path, device: made.setdefault("clip", path))
    scorers = scoring.make_scorers({})
    assert made == {"identity": ("dino", None), "clip": DEFAULT_CHECKPOINTS["clip"]}
    assert scorers.prompt_metric == scoring.CLIP_T and "DINO ViT-S/16" in scorers.identity_text
    # A declared CLIP (prompt role) is used; another prompt backbone gives no CLIP-T, and says why.
    assert scoring.clip_source({"prompt": {"name": "clip", "path": "my/clip"}}, None)[0] == "my/clip"
    assert scoring.clip_source({"condition": {"name": "clip"}}, None)[0] == DEFAULT_CHECKPOINTS["clip"]
    path, why = scoring.clip_source({"prompt": {"name": "pkg.mod:fn"}}, None)
    assert path is None and "pkg.mod:fn" in why
    assert scoring.clip_source({"identity": {"name": IDENTITY}}, None)[0] is None  # the embedded world
    assert scoring.clip_source({"identity": {"name": IDENTITY}}, "x")[0] == "x"  # --clip


def test_a_broken_evaluation_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "evaluation.json").write_text("{")
    with pytest.raises(ValueError, match="evaluation.json"):
        read_evaluation(tmp_path)
    assert read_evaluation(tmp_path / "elsewhere") == (None, None)
    shutil.rmtree(tmp_path / "evaluation")


@pytest.mark.parametrize("method", ["AdapterAttentionFineTuning", "ConditionTuning"])
def test_an_export_with_inserted_modules_is_loaded_by_its_method(method, tmp_path):
    from lightning_ft import methods
    from lightning_ft.evaluation.source import Target, load_model
    cls = getattr(methods, method)
    torch.manual_seed(0)
    module = tiny_module(cls)
    perturb(module)  # inserted modules start as no-ops: moved, the export must carry them
    if hasattr(module, "reference_conditions"):  # ANL samples from its subject's condition images, set by a fit
        module.reference_conditions = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    export = module.save_pretrained(tmp_path / "export")
    loaded = load_model(Target(export))
    assert type(loaded) is cls
    module.eval()
    kwargs = {"prompts": ["a sks star"] * 2, "seeds": [0, 1], "steps": 2}
    torch.testing.assert_close(loaded.generate(**kwargs), module.generate(**kwargs), atol=1e-5, rtol=0)
