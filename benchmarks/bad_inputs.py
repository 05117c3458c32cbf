"""Bad inputs and what lightning-ft says about them: each case is triggered for real and its message recorded.

Most cases are errors. Some are inputs that train but probably not as meant (a 1x1 image, a prompt the tokenizer
cuts): those warn, and the row records the warnings (error column ``warning``).

To run: python -m benchmarks.bad_inputs      (about three minutes; writes benchmarks/results/bad_inputs.md)
The same cases run as tests (tests/cli/test_bad_inputs.py), which also check that each row of the committed table
is what the case says now, so the table in docs/bad_inputs.md stays true.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TINY = str(REPO / "configs/model/tiny_t2i.yaml")
DREAMBOOTH = str(REPO / "experiments/dreambooth.yaml")
SUBJECT = str(REPO / "configs/data/embedded_subject.yaml")  # the recipe's data: the embedded subject
TABLE = RESULTS / "bad_inputs.md"


@dataclass
class Case:
    name: str
    #: Raises (or exits) on the bad input; gets a scratch folder. A ``warns`` case returns, and may return a line
    #: it printed that belongs in the row.
    run: Callable[[Path], str | None]
    expect: tuple[str, ...]  # what the message must name
    warns: bool = False  # the input trains, with a warning (the row: lightning-ft's warnings)


def _images(folder: Path, count: int = 2, green: int = 80) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (40 * i, green, 120)).save(folder / f"img_{i}.png")
    return folder


def _cli(*args: str) -> None:
    from lightning_ft.run import main

    main(["--config", DREAMBOOTH, "--config", SUBJECT, "--config", TINY, "--trainer.logger", "false", *args],
         run=False)  # fmt: skip


def _fit(*args: str) -> None:
    """``fit`` through the CLI, with no callbacks; the cases fail before the first step."""
    from lightning_ft.run import main

    main(["fit", "--config", DREAMBOOTH, "--config", SUBJECT, "--config", TINY, "--trainer.logger", "false",
          "--trainer.callbacks", "[]",
          "--trainer.max_steps", "2", "--data.num_class_images", "2", "--model.sample_steps", "2", *args])  # fmt: skip


def _trained(tmp: Path, *args: str) -> str:
    """The last.ckpt of a 1-step run (outside ``runs/``, whose earlier outputs must stay as they are)."""
    callbacks = "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}]"
    _fit("--trainer.max_steps", "1", "--trainer.callbacks", callbacks, "--trainer.default_root_dir",
         str(tmp / "first"), "--trainer.enable_progress_bar", "false", *args)  # fmt: skip
    return str(tmp / "first" / "checkpoints" / "last.ckpt")


def _setup(folder: Path, **kwargs) -> None:
    from lightning_ft.data import LimitedDataModule

    LimitedDataModule(str(folder), **{"resolution": 32, **kwargs}).setup("fit")


def corrupt_image(tmp: Path) -> None:
    folder = _images(tmp / "data")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _setup(folder, instance_prompt="a sks star")


def empty_folder(tmp: Path) -> None:
    (tmp / "empty").mkdir()
    _setup(tmp / "empty", instance_prompt="a sks star")


def missing_folder(tmp: Path) -> None:
    _setup(tmp / "nowhere", instance_prompt="a sks star")


def float_image(tmp: Path) -> None:
    import numpy as np
    from PIL import Image

    folder = tmp / "data"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32), dtype=np.float32), mode="F").save(folder / "depth.tiff")
    (folder / "depth.tiff").rename(folder / "depth.png")
    _setup(folder, instance_prompt="a sks star")


def captions_for_other_files(tmp: Path) -> None:
    folder = _images(tmp / "data")
    captions = tmp / "captions.jsonl"
    captions.write_text(
        json.dumps({"file": "img_0.png", "caption": "x"})
        + "\n"
        + json.dumps({"file": "cat.png", "caption": "y"})
        + "\n"
    )
    _setup(folder, captions_file=str(captions))


def captions_bad_line(tmp: Path) -> None:
    folder = _images(tmp / "data")
    captions = tmp / "captions.jsonl"
    captions.write_text('{"file": "img_0.png", "caption": "x"}\n{"file": "img_1.png"\n')
    _setup(folder, captions_file=str(captions))


def no_captions_no_prompt(tmp: Path) -> None:
    _setup(_images(tmp / "data"))


def class_images_without_prompt(tmp: Path) -> None:
    _setup(_images(tmp / "data"), instance_prompt="a sks star", num_class_images=10)


def unknown_key(tmp: Path) -> None:
    _cli("--model.init_args.learning_rate", "1e-4")


def wrong_type(tmp: Path) -> None:
    _cli("--model.init_args.lr", "fast")


def missing_pretrained(tmp: Path) -> None:
    from lightning_ft.core import DiffusionBase

    DiffusionBase(pretrained=str(tmp / "no-such-model"))


def bad_trainable(tmp: Path) -> None:
    _cli("--model.init_args.trainable", "everything")


def method_incompatible_with_model(tmp: Path) -> None:
    import yaml

    from lightning_ft.methods import ConditionTuning

    components = yaml.safe_load((REPO / "configs/model/tiny_dit.yaml").read_text())["model"]["init_args"]["components"]
    ConditionTuning(components=components)


def resolution_mismatch(tmp: Path) -> None:
    import yaml

    from lightning_ft.methods import DreamBooth

    components = yaml.safe_load(Path(TINY).read_text())["model"]["init_args"]["components"]
    DreamBooth(components=components).check_resolution(30)


def lora_targets_match_nothing(tmp: Path) -> None:
    _cli("--model.init_args.trainable", "lora", "--model.init_args.lora_target_modules", "[to_nothing]")


def class_model_without_labels(tmp: Path) -> None:
    import types

    import yaml

    from lightning_ft.core import DiffusionBase
    from lightning_ft.data import LimitedDataModule

    components = yaml.safe_load((REPO / "configs/model/tiny_dit.yaml").read_text())["model"]["init_args"]["components"]
    data = LimitedDataModule(str(_images(tmp / "data")), instance_prompt="x", resolution=32)
    data.trainer = types.SimpleNamespace(lightning_module=DiffusionBase(components=components))
    data.setup("fit")


def bad_sweep_file(tmp: Path) -> None:
    from lightning_ft.sweep import load_sweep

    (tmp / "sweep.yaml").write_text("command:\n  - python\n  - train.py\nparameters: {}\nmetric: {name: fid/fid}\n")
    load_sweep(tmp / "sweep.yaml")


def a3fta_export_as_plain(tmp: Path) -> None:
    import yaml

    from lightning_ft.core import DiffusionBase
    from lightning_ft.methods import AdapterAttentionFineTuning

    components = yaml.safe_load(Path(TINY).read_text())["model"]["init_args"]["components"]
    folder = AdapterAttentionFineTuning(components=components).save_pretrained(tmp / "export")
    DiffusionBase(pretrained=str(folder))


def unknown_embedded_target(tmp: Path) -> None:
    from lightning_ft.embedded.targets import ensure_target

    ensure_target("dragons", tmp)


def several_unreadable_images(tmp: Path) -> None:
    folder = _images(tmp / "data", 3)
    (folder / "broken_a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "broken_b.jpg").write_bytes(b"nothing")
    _setup(folder, instance_prompt="a sks star")


def lora_rank_zero(tmp: Path) -> None:
    _cli("--model.init_args.trainable", "lora", "--model.init_args.lora_rank", "0")


def zero_sample_steps(tmp: Path) -> None:
    _cli("--model.init_args.sample_steps", "0")


def pretrained_without_denoiser(tmp: Path) -> None:
    import shutil

    from lightning_ft.embedded import asset_path
    from lightning_ft.run import main

    folder = tmp / "no-denoiser"
    shutil.copytree(asset_path("shapes-t2i"), folder, ignore=shutil.ignore_patterns("unet"))
    main(["--config", DREAMBOOTH, "--config", SUBJECT, "--trainer.logger", "false", "--model.init_args.pretrained",
          str(folder)], run=False)  # fmt: skip


def negative_lr(tmp: Path) -> None:
    _cli("--model.init_args.lr", "-1")


def lr_scheduler_typo(tmp: Path) -> None:
    _cli("--model.init_args.lr_scheduler", "cosin")


def prediction_type_typo(tmp: Path) -> None:
    _cli("--model.init_args.prediction_type", "v-prediction")


def empty_instance_prompt(tmp: Path) -> None:
    _cli("--data.init_args.instance_prompt", "")


def negative_class_images(tmp: Path) -> None:
    _cli("--data.init_args.num_class_images", "-3")


def condition_dropout_over_one(tmp: Path) -> None:
    _cli("--model.init_args.condition_dropout", "1.5")


def ema_decay_over_one(tmp: Path) -> None:
    _cli("--model.init_args.ema_decay", "2.0")


def zero_steps(tmp: Path) -> None:
    _fit("--trainer.max_steps", "0")


def ckpt_not_a_checkpoint(tmp: Path) -> None:
    # The earlier run's last.ckpt of the scratch folder holds a few bytes of text.
    _fit("--ckpt_path", "runs/dreambooth/lightning_logs/version_0/checkpoints/last.ckpt")


def ckpt_missing(tmp: Path) -> None:
    _fit("--ckpt_path", "last.ckpt")


def ckpt_last_without_earlier_run(tmp: Path) -> None:
    _fit("--ckpt_path", "last", "--trainer.default_root_dir", str(tmp / "elsewhere"))


def ckpt_of_another_method(tmp: Path) -> None:
    _fit("--model.class_path", "lightning_ft.methods.BayesianFineTuning", "--ckpt_path", _trained(tmp))


def ckpt_of_another_trainable_set(tmp: Path) -> None:
    _fit("--model.trainable", "lora", "--ckpt_path", _trained(tmp))


def ckpt_of_another_lora_rank(tmp: Path) -> None:
    ckpt = _trained(tmp, "--model.trainable", "lora")
    _fit("--model.trainable", "lora", "--model.lora_rank", "8", "--ckpt_path", ckpt)


def checkpoint_every_without_checkpoint(tmp: Path) -> None:
    _fit("--checkpoint_every", "50")


# ------------------------------------------------------------------------------- odd inputs (warnings)
def _tiny_model():
    import yaml

    from lightning_ft.methods import DreamBooth

    return DreamBooth(components=yaml.safe_load(Path(TINY).read_text())["model"]["init_args"]["components"])


def _check(folder: Path, module=None, **kwargs) -> None:
    """What the CLI runs before training: the data read and checked against the model."""
    from lightning_ft.data import LimitedDataModule

    LimitedDataModule(str(folder), **{"resolution": 32, **kwargs}).check_inputs(module)


def tiny_image(tmp: Path) -> None:
    from PIL import Image

    folder = _images(tmp / "data")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "dot.png")
    _check(folder, instance_prompt="a sks star")


def strip_image(tmp: Path) -> None:
    from PIL import Image

    folder = _images(tmp / "data")
    Image.new("RGB", (2000, 10), (20, 90, 30)).save(folder / "strip.png")
    _check(folder, instance_prompt="a sks star")


def duplicate_images(tmp: Path) -> None:
    from PIL import Image

    folder = _images(tmp / "data")
    Image.open(folder / "img_1.png").save(folder / "img_1 copy.bmp")
    _check(folder, instance_prompt="a sks star")


def class_prompt_is_instance_prompt(tmp: Path) -> None:
    _check(_images(tmp / "data"), instance_prompt="a star", class_prompt="a star", num_class_images=2,
           class_dir=str(_images(tmp / "classes", green=200)))  # fmt: skip


def prompt_overridden_by_txt(tmp: Path) -> None:
    folder = _images(tmp / "data")
    for image in folder.glob("*.png"):
        image.with_suffix(".txt").write_text("a red star on a gray background")
    _check(folder, instance_prompt="a sks star")


def prompt_overridden_by_captions_file(tmp: Path) -> None:
    folder = _images(tmp / "data")
    (tmp / "captions.csv").write_text("img_0.png,a red star\nimg_1.png,a blue star\n")
    _check(folder, instance_prompt="a sks star", captions_file=str(tmp / "captions.csv"))


def prompt_too_long(tmp: Path) -> None:
    # The tiny model's word tokenizer keeps 12 ids (<bos>, 10 words, <eos>); these are 15 words it knows.
    _check(_images(tmp / "data"), _tiny_model(),
           instance_prompt="a sks red star on a gray background a red circle on a navy square")  # fmt: skip


def unknown_words(tmp: Path) -> None:
    _check(_images(tmp / "data"), _tiny_model(), instance_prompt="a photo of a sks dog")


def unsupported_format(tmp: Path) -> str:
    import lightning as L

    from lightning_ft.data import LimitedDataModule

    folder = _images(tmp / "data")
    (folder / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    for i in range(6):
        (folder / f"notes_{i}.md").write_text("shot on a phone")
    data = LimitedDataModule(str(folder), instance_prompt="a sks star", resolution=32)
    data.trainer = L.Trainer(logger=False, default_root_dir=str(tmp / "run"), accelerator="cpu",
                             enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        data.setup("fit")
    return next(line for line in printed.getvalue().splitlines() if "skipped_files.txt" in line)


# ------------------------------------------------------------------------------- early and clear errors
def corrupt_class_image(tmp: Path) -> None:
    classes = _images(tmp / "classes")
    (classes / "img_1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _check(_images(tmp / "data"), instance_prompt="a sks star", class_dir=str(classes), class_prompt="a star",
           num_class_images=4)  # fmt: skip


def only_unsupported_images(tmp: Path) -> None:
    folder = tmp / "phone"
    folder.mkdir()
    for i in range(2):
        (folder / f"IMG_000{i}.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    _setup(folder, instance_prompt="a sks star")


@contextlib.contextmanager
def _cache_root(path: Path):
    """$LIGHTNING_FT_CACHE at ``path`` for the case (the messages name the root: not the machine's own)."""
    before = os.environ.get("LIGHTNING_FT_CACHE")
    os.environ["LIGHTNING_FT_CACHE"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["LIGHTNING_FT_CACHE"]
        else:
            os.environ["LIGHTNING_FT_CACHE"] = before


def class_cache_not_writable(tmp: Path) -> None:
    (tmp / "full-disk").write_text("a file where the cache folder should be")
    with _cache_root(tmp / "cache"):
        _fit("--data.class_cache_dir", str(tmp / "full-disk" / "class_images"))


def memory_cache_not_writable(tmp: Path) -> None:
    import yaml

    from lightning_ft.methods import DiffTuning

    (tmp / "full-disk").write_text("a file where the cache folder should be")
    components = yaml.safe_load(Path(TINY).read_text())["model"]["init_args"]["components"]
    with _cache_root(tmp / "cache"):
        module = DiffTuning(components=components, memory_size=2, memory_cache_dir=str(tmp / "full-disk" / "bank"),
                            sample_steps=2)  # fmt: skip
        module.prepare_memory_bank()


def cache_root_not_writable(tmp: Path) -> None:
    (tmp / "full-disk").write_text("a file where the cache folder should be")
    with _cache_root(tmp / "full-disk" / "cache"):
        _cli()  # the data config's ${embedded:subject} writes the subject into the cache



# ------------------------------------------------------------------------------- data options (issue 27)
def _masks(folder: Path, names: list[str], size: tuple[int, int] = (32, 32), value: int = 255) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("L", size, value).save(folder / name)
    return folder


def masks_not_matching_images(tmp: Path) -> None:
    folder = _images(tmp / "data")
    masks = _masks(tmp / "masks", ["img_0.png", "other.png"])
    _check(folder, instance_prompt="a sks star", mask_dir=str(masks))


def mask_of_another_size(tmp: Path) -> None:
    folder = _images(tmp / "data")
    masks = _masks(tmp / "masks", ["img_0.png"])
    _masks(masks, ["img_1.png"], size=(64, 48))
    _check(folder, instance_prompt="a sks star", mask_dir=str(masks))


def all_black_mask(tmp: Path) -> None:
    folder = _images(tmp / "data")
    masks = _masks(tmp / "masks", ["img_0.png"])
    _masks(masks, ["img_1.png"], value=0)
    _check(folder, instance_prompt="a sks star", mask_dir=str(masks))


def bucket_the_model_cannot_take(tmp: Path) -> None:
    _check(_images(tmp / "data"), _tiny_model(), instance_prompt="a sks star", buckets=[[32, 32], [42, 24]])


def caption_dropout_over_one(tmp: Path) -> None:
    _check(_images(tmp / "data"), instance_prompt="a sks star", caption_dropout=1.5)


def keep_tokens_without_shuffling(tmp: Path) -> None:
    _check(_images(tmp / "data"), instance_prompt="sks, star", keep_tokens=1)


CASES = [
    Case("corrupt image in the instance folder", corrupt_image, ("broken.png", "cannot be read")),
    Case("empty instance folder", empty_folder, ("data.instance_dir", "holds no image")),
    Case("instance folder does not exist", missing_folder, ("data.instance_dir", "does not exist")),
    Case("32-bit float image", float_image, ("depth.png", "mode 'F'")),
    Case("captions file names other images", captions_for_other_files, ("captions.jsonl", "cat.png")),
    Case("captions file with a broken line", captions_bad_line, ("captions.jsonl", "line 2")),
    Case("no captions and no prompt", no_captions_no_prompt, ("data.instance_dir", "no prompt")),
    Case("class images without a class prompt", class_images_without_prompt, ("data.class_prompt",)),
    Case("unknown config key", unknown_key, ("learning_rate",)),
    Case("wrong type for a key", wrong_type, ("lr", "fast")),
    Case("nonexistent pretrained path", missing_pretrained, ("model.pretrained", "no-such-model")),
    Case("unknown trainable set", bad_trainable, ("model.trainable", "everything")),
    Case("method incompatible with the model (ANL on a DiT)", method_incompatible_with_model, ("ResnetBlock2D",)),
    Case("resolution the model cannot take", resolution_mismatch, ("data.resolution=30",)),
    Case("LoRA targets that match no layer", lora_targets_match_nothing, ("lora_target_modules", "to_nothing")),
    Case("class-conditional model, data without labels", class_model_without_labels, ("data.class_label",)),
    Case("sweep file without ${args} / the project CLI", bad_sweep_file, ("sweep.yaml", "command")),
    Case("A3FTA export loaded as a plain model", a3fta_export_as_plain, ("AdapterAttentionFineTuning",)),
    Case("unknown embedded target", unknown_embedded_target, ("dragons",)),
    Case("several unreadable images", several_unreadable_images, ("2 of 5 images", "broken_a.png", "broken_b.jpg")),
    Case("LoRA rank 0", lora_rank_zero, ("model.lora_rank=0",)),
    Case("0 sampling steps", zero_sample_steps, ("model.sample_steps=0",)),
    Case("pretrained folder without a denoiser", pretrained_without_denoiser, ("model.pretrained", "unet/")),
    Case("negative learning rate", negative_lr, ("model.lr=-1",)),
    Case("typo in the LR schedule", lr_scheduler_typo, ("model.lr_scheduler='cosin'",)),
    Case("typo in the prediction type", prediction_type_typo, ("model.prediction_type='v-prediction'",)),
    Case("empty instance prompt", empty_instance_prompt, ("data.instance_prompt=''",)),
    Case("negative number of class images", negative_class_images, ("data.num_class_images=-3",)),
    Case("condition dropout over 1", condition_dropout_over_one, ("model.condition_dropout=1.5",)),
    Case("EMA decay over 1", ema_decay_over_one, ("model.ema_decay=2.0",)),
    Case("0 training steps", zero_steps, ("trainer.max_steps=0",)),
    Case("ckpt_path that is not a checkpoint", ckpt_not_a_checkpoint, ("ckpt_path", "not a Lightning checkpoint")),
    Case("ckpt_path that does not exist", ckpt_missing, ("ckpt_path='last.ckpt'", "does not exist")),
    Case("ckpt_path last with no earlier run", ckpt_last_without_earlier_run, ("ckpt_path='last'", "no last.ckpt")),
    Case("checkpoint of another method", ckpt_of_another_method, ("DreamBooth", "BayesianFineTuning")),
    Case("checkpoint of another trainable set", ckpt_of_another_trainable_set, ("'full'", "'lora'")),
    Case("checkpoint of another LoRA rank", ckpt_of_another_lora_rank, ("lora_rank: 4 in the checkpoint, 8 now",)),
    Case("checkpoint_every without a ModelCheckpoint", checkpoint_every_without_checkpoint, ("checkpoint_every=50",)),
    Case("corrupt image in data.class_dir", corrupt_class_image, ("data.class_dir", "img_1.png", "cannot be read")),
    Case(
        "folder of images Pillow cannot open (HEIC)",
        only_unsupported_images,
        ("data.instance_dir", "IMG_0000.heic", "format Pillow cannot open"),
    ),
    Case(
        "class-image cache folder cannot be written",
        class_cache_not_writable,
        ("data.class_cache_dir", "full-disk/class_images", "LIGHTNING_FT_CACHE"),
    ),
    Case(
        "memory-bank cache folder cannot be written",
        memory_cache_not_writable,
        ("model.memory_cache_dir", "full-disk/bank", "LIGHTNING_FT_CACHE"),
    ),
    Case(
        "cache root cannot be made (${embedded:...})",
        cache_root_not_writable,
        ("full-disk/cache", "LIGHTNING_FT_CACHE"),
    ),
    Case("masks that do not match the images", masks_not_matching_images, ("data.mask_dir", "img_1", "other.png")),
    Case("mask of another size than its image", mask_of_another_size, ("data.mask_dir", "img_1.png", "64x48")),
    Case("bucket the model cannot take", bucket_the_model_cannot_take, ("data.buckets", "42x24", "multiples of 4")),
    Case("caption dropout over 1", caption_dropout_over_one, ("data.caption_dropout=1.5",)),
    Case("image far below the resolution (1x1)", tiny_image, ("dot.png", "1x1", "data.resolution=32"), warns=True),
    Case("extreme aspect ratio (2000x10)", strip_image, ("strip.png", "2000x10", "keeps 0.5%"), warns=True),
    Case("the same image twice", duplicate_images, ("img_1.png", "img_1 copy.bmp", "identical pixels"), warns=True),
    Case(
        "class prompt equal to the instance prompt",
        class_prompt_is_instance_prompt,
        ("data.class_prompt='a star'", "teach the subject as the class"),
        warns=True,
    ),
    Case(
        "instance prompt overridden by .txt captions",
        prompt_overridden_by_txt,
        ("data.instance_prompt='a sks star' is not used", ".txt caption files"),
        warns=True,
    ),
    Case(
        "instance prompt overridden by a captions file",
        prompt_overridden_by_captions_file,
        ("data.instance_prompt='a sks star' is not used", "captions.csv"),
        warns=True,
    ),
    Case(
        "prompt longer than the tokenizer keeps",
        prompt_too_long,
        ("data.instance_prompt", "keeps 12 of its 17 tokens (5 dropped)"),
        warns=True,
    ),
    Case(
        "words the tokenizer does not know",
        unknown_words,
        ("data.instance_prompt", "'photo', 'of', 'dog'", "'<unk>'"),
        warns=True,
    ),
    Case(
        "an image format Pillow cannot open, among others",
        unsupported_format,
        ("IMG_0001.heic", "format Pillow cannot open", "all 7 skipped", "skipped_files.txt"),
        warns=True,
    ),
    Case("an all-black loss mask", all_black_mask, ("data.mask_dir", "img_1.png", "zero"), warns=True),
    Case("keep_tokens without shuffle_tags", keep_tokens_without_shuffling, ("data.keep_tokens=1",), warns=True),
]


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def trigger(case: Case) -> tuple[str, str, bool]:
    """Run a case in a scratch folder that already holds a previous run's outputs (as the working directory, where
    the experiment files write ``runs/``); returns (error type, message, previous outputs intact). A ``warns`` case
    returns ("warning", its lightning-ft warnings); a case that neither fails nor warns as said raises
    AssertionError."""
    stderr = io.StringIO()
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.redirect_stderr(stderr),
        contextlib.chdir(tmp),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        previous = Path(tmp) / "runs" / "dreambooth" / "lightning_logs" / "version_0"
        (previous / "checkpoints").mkdir(parents=True)
        (previous / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
        (previous / "metrics.csv").write_text("step,train/loss\n0,0.5\n")
        before = _snapshot(Path(tmp) / "runs")
        try:
            try:
                printed = case.run(Path(tmp))
            except Exception as error:  # noqa: BLE001 - the scratch folder's name is noise in the table
                raise type(error)(str(error).replace(tmp, "<tmp>")) from None
        except SystemExit:  # the CLI parser prints its error and exits with status 2
            text = stderr.getvalue()
            text = text[text.rfind("error:") :] if "error:" in text else text[-500:]
            # jsonargparse lists every Union member it tried; the project's line is the informative one.
            keep = [
                line.strip()
                for line in text.splitlines()
                if not line.strip().startswith(
                    ("Subtypes", "Given value", "- Expected a <class 'NoneType'>", "Does not validate")
                )
            ]
            return "CLI exit 2", " ".join(k for k in keep if k), _snapshot(Path(tmp) / "runs") == before
        except Exception as error:  # noqa: BLE001 - recording what each bad input raises is the point
            message = str(error)
            if "Does not validate against any of the Union subtypes" in message:  # the module raised under the CLI
                message = message[message.find("- ") + 2 :].split("\n")[0] if "- " in message else message
            if case.warns:
                raise AssertionError(f"odd input {case.name!r} should only warn, but failed: {message}") from None
            return type(error).__name__, message, _snapshot(Path(tmp) / "runs") == before
        if case.warns:
            said = [str(w.message).removeprefix("lightning-ft: ") for w in caught
                    if str(w.message).startswith("lightning-ft: ")]  # fmt: skip
            said += [printed.removeprefix("lightning-ft: ")] if printed else []
            if said:
                return "warning", " / ".join(said).replace(tmp, "<tmp>"), _snapshot(Path(tmp) / "runs") == before
    raise AssertionError(f"bad input {case.name!r} did not " + ("warn" if case.warns else "fail"))


def row(case: Case, kind: str, message: str) -> str:
    """The table row of ``case``; what may differ between two runs (a process id, an address) is normalised."""
    message = " ".join(message.split())
    message = re.sub(r"\.partial-\d+-[0-9a-f]+", ".partial-<pid>-<id>", message)
    message = re.sub(r"\b0x[0-9a-f]{6,}\b", "0x<address>", message)
    return f"| {case.name} | {kind} | {message[:300].replace('|', '/')} |"


def read_table(path: Path = TABLE) -> dict[str, str]:
    """Case name -> its row in the committed table."""
    lines = path.read_text().splitlines()[2:]
    return {line[2:].split(" | ", 1)[0]: line for line in lines if line.startswith("| ")}


def main() -> list[str]:
    rows = []
    for case in CASES:
        kind, message, intact = trigger(case)
        rows.append(row(case, kind, message))
        print(rows[-1] + ("" if intact else " (the earlier run's outputs changed!)"), flush=True)
    lines = ["| bad input | error | message (first 300 characters) |", "|---|---|---|", *rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    TABLE.write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
