"""Messy inputs: what trains but probably not as meant is said (one warning each, naming the file or key), every
format Pillow reads is read, skipped files are all listed, a bad class folder or an unwritable cache fails early and
clearly, and the run report shows the instance images as they were trained on."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_module, write_images
from PIL import Image

from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.core.tokenizer import build_word_tokenizer
from lightning_ft.data import LimitedDataModule
from lightning_ft.data.memory_bank import generate_memory_bank
from lightning_ft.data.odd_inputs import token_warnings
from lightning_ft.images import classify, load_image
from lightning_ft.paths import CacheNotWritableError, cache_root


def _odd(messages) -> list[str]:
    return [str(w.message) for w in messages if str(w.message).startswith("lightning-ft: ")]


def _read(folder, module=None, trainer=None, **kwargs) -> tuple[LimitedDataModule, list[str]]:
    """The data module on ``folder``, set up (or only checked against ``module``), and the warnings it gave."""
    data = LimitedDataModule(str(folder), **{"resolution": 32, **kwargs})
    data.trainer = trainer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.check_inputs(module) if module is not None else data.setup("fit")
    return data, _odd(caught)


# ------------------------------------------------------------------------------------------------- images
def test_an_image_far_below_the_resolution_is_named_with_its_size(tmp_path):
    folder = write_images(tmp_path / "data", 2)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "dot.png")
    Image.new("RGB", (8, 9), (200, 30, 30)).save(folder / "quarter.png")  # 8 = 32 / 4: not under a quarter
    _, said = _read(folder, instance_prompt="a sks star")
    assert said == [
        f"lightning-ft: data.instance_dir: '{folder}/dot.png' is 1x1 pixels, far below data.resolution=32 (its shorter "
        "side is under a quarter of it): training upscales it 32x, to blur or a flat colour; use a larger image, or a "
        "lower data.resolution"
    ]


def test_an_image_the_crop_mostly_discards_says_the_kept_fraction(tmp_path):
    folder = write_images(tmp_path / "data", 2)
    Image.new("RGB", (2000, 10), (20, 90, 30)).save(folder / "strip.png")
    Image.new("RGB", (128, 32), (20, 90, 30)).save(folder / "four_to_one.png")  # keeps exactly 25%: not under
    _, said = _read(folder, instance_prompt="a sks star")
    assert said == [
        f"lightning-ft: data.instance_dir: '{folder}/strip.png' is 2000x10 pixels: the square crop of training keeps "
        "0.5% of it (under 25%), so most of it is never seen; crop it around the subject"
    ]


def test_many_small_images_give_five_lines_and_a_count(tmp_path):
    folder = tmp_path / "icons"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (4, 4), (30 * i, 0, 0)).save(folder / f"icon_{i}.png")
    _, said = _read(folder, instance_prompt="a sks star")
    assert len(said) == 6 and all("far below data.resolution=32" in s for s in said[:5])
    assert said[5] == "lightning-ft: data.instance_dir: and 3 more images far below data.resolution=32"


def test_identical_images_are_named_together_across_formats_and_folders(tmp_path):
    folder = write_images(tmp_path / "data", 3)
    Image.open(folder / "img_01.png").save(folder / "img_01_copy.bmp")  # the same pixels in another format
    classes = write_images(tmp_path / "cls", 2, seed=7)
    Image.open(folder / "img_02.png").save(classes / "img_02.png")  # the subject among the class images
    _, said = _read(folder, instance_prompt="a sks star", class_dir=str(classes), class_prompt="a star",
                    num_class_images=3)  # fmt: skip
    assert said == [
        f"lightning-ft: data.instance_dir: 2 images are the same (identical pixels): '{folder}/img_01.png', "
        f"'{folder}/img_01_copy.bmp'; each copy is one more training image of the same view: keep one",
        f"lightning-ft: data.instance_dir and data.class_dir: 2 images are the same (identical pixels): "
        f"'{folder}/img_02.png', '{classes}/img_02.png'; each copy is one more training image of the same view: "
        "keep one",
    ]


# ------------------------------------------------------------------------------------------------ prompts
def test_class_prompt_equal_to_the_instance_prompt_is_said(tmp_path):
    folder = write_images(tmp_path / "data", 2)
    classes = write_images(tmp_path / "cls", 2, seed=3)
    _, said = _read(folder, instance_prompt="a star", class_dir=str(classes), class_prompt="A star ",
                    num_class_images=2)  # fmt: skip
    assert said == [
        "lightning-ft: data.class_prompt='A star ' is the instance prompt of data.instance_prompt: prior preservation "
        "would then teach the subject as the class itself; give the instance prompt a rare identifier, e.g. "
        "'A sks star'"
    ]
    _, said = _read(folder, instance_prompt="a sks star", class_dir=str(classes), class_prompt="a star",
                    num_class_images=2)  # fmt: skip
    assert said == []


def test_an_instance_prompt_that_captions_override_says_which_wins(tmp_path):
    folder = write_images(tmp_path / "data", 2, captions=True)
    data, said = _read(folder, instance_prompt="a sks star")
    assert data.dataset.prompts != ["a sks star"] * 2, "the .txt captions are what is trained on"
    assert said == [
        "lightning-ft: data.instance_prompt='a sks star' is not used: the 2 .txt caption files beside the images "
        "(e.g. 'img_00.txt') win over it; remove or rename them to train on the prompt; or omit data.instance_prompt"
    ]
    plain = write_images(tmp_path / "plain", 2)
    (tmp_path / "c.csv").write_text("img_00.png,one\nimg_01.png,two\n")
    _, said = _read(plain, instance_prompt="a sks star", captions_file=str(tmp_path / "c.csv"))
    assert said == [
        f"lightning-ft: data.instance_prompt='a sks star' is not used: data.captions_file='{tmp_path}/c.csv' gives "
        "each image its caption (first comes a captions file, then .txt files beside the images, then "
        "data.instance_prompt); or omit data.instance_prompt"
    ]


def test_a_prompt_longer_than_the_tokenizer_keeps_says_how_many_tokens_are_dropped(tmp_path):
    folder = write_images(tmp_path / "data", 2)
    # tiny_t2i's word tokenizer keeps 12 ids: <bos>, 10 words, <eos>; this prompt is 15 words.
    prompt = "a sks red star on a gray background a red circle on a navy square"
    data, said = _read(folder, module=tiny_module(), instance_prompt=prompt)
    assert said == [
        f"lightning-ft: data.instance_prompt: {prompt!r} is longer than the model reads: tokenizer keeps 12 of its 17 "
        "tokens (5 dropped): the end of the prompt is not trained on; shorten it"
    ]
    # 10 words: <bos>, the prompt and <eos> fill the 12 ids exactly, and nothing is dropped.
    _, said = _read(folder, module=tiny_module(), instance_prompt="a sks red star on a gray background a red")
    assert said == []


def test_words_the_tokenizer_does_not_know_are_named_with_where_the_prompt_comes_from(tmp_path):
    folder = write_images(tmp_path / "data", 2)
    (folder / "img_00.txt").write_text("a photo of a sks dog")
    (folder / "img_01.txt").write_text("a sks red star")
    classes = write_images(tmp_path / "cls", 2, seed=3)
    module = tiny_module()
    data, said = _read(folder, module=module, class_dir=str(classes), class_prompt="a dog", num_class_images=2)
    assert said == [
        f"lightning-ft: caption file '{folder}/img_00.txt': tokenizer does not know 'photo', 'of', 'dog' in 'a photo "
        "of a sks dog': they become '<unk>', as every unknown word does, so the model cannot tell them apart; use "
        "words of the model's vocabulary",
        "lightning-ft: data.class_prompt: tokenizer does not know 'dog' in 'a dog': it becomes '<unk>', as every "
        "unknown word does, so the model cannot tell them apart; use words of the model's vocabulary",
    ]
    with warnings.catch_warnings(record=True) as caught:  # the CLI checks, then setup checks again: said once
        warnings.simplefilter("always")
        data.check_inputs(module)
    assert _odd(caught) == []


class _TemplatedFamily:
    """A family that wraps prompts in a template and returns ids, a mask and an empty-prompt flag (as Sana's):
    no plain tokenizer makes its ids, and the flag does not change with the text."""

    def tokenize(self, parts, prompts):
        tokens = parts.tokenizers["tokenizer"]([f"on on on {p}" for p in prompts], padding="max_length",
                                               max_length=12, truncation=True, return_tensors="pt")  # fmt: skip
        return [tokens.input_ids, tokens.attention_mask, torch.tensor([[int(not p)] for p in prompts])]


def test_token_checks_ask_the_family_and_work_with_a_prompt_template():
    words = ["a", "red", "star", "on", "gray", "background", "circle", "navy", "square", "sks"]
    module = SimpleNamespace(family=_TemplatedFamily(), parts=SimpleNamespace(tokenizers={
        "tokenizer": build_word_tokenizer(words, model_max_length=64), "tokenizer_2": None}))  # fmt: skip
    long = "a sks red star on a gray background a red circle on a navy square"
    said = token_warnings(module, {long: "data.instance_prompt", "a red star": "data.class_prompt"})
    assert said == [
        f"data.instance_prompt: {long!r} is longer than the model reads: it keeps 12 tokens with its prompt template, "
        "the prompt alone is 17 (tokenizer), so at least 5 are dropped: the end of the prompt is not trained on; "
        "shorten it"
    ]
    # <bos>, the 3 template words, 7 words and <eos> fill the 12 ids exactly.
    assert token_warnings(module, {"a sks red star on a gray": "data.instance_prompt"}) == []
    # Without a tokenizer (a class-conditional model) there is nothing to check.
    assert token_warnings(SimpleNamespace(family=object(), parts=SimpleNamespace(tokenizers={})), {long: "x"}) == []


def test_clean_inputs_say_nothing(tmp_path):
    folder = write_images(tmp_path / "data", 3)
    _, said = _read(folder, module=tiny_module(), instance_prompt="a sks red star on a gray background")
    assert said == []


# -------------------------------------------------------------------------------------------------- formats
def _formats(folder: Path) -> dict[str, np.ndarray]:
    """One image per format Pillow writes here, each of its own colour; returns file name -> expected pixel."""
    folder.mkdir(parents=True)
    expected = {}
    for i, (name, kwargs) in enumerate([("a.tif", {}), ("b.tiff", {"compression": "tiff_lzw"}), ("c.avif", {}),
                                        ("d.webp", {"lossless": True}), ("e.bmp", {}), ("f.qoi", {})]):  # fmt: skip
        colour = (40 * i, 255 - 40 * i, 128)
        Image.new("RGB", (32, 32), colour).save(folder / name, **kwargs)
        expected[name] = np.array(colour)
    frames = [Image.new("RGB", (32, 32), (250, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 250))]
    frames[0].save(folder / "g.gif", save_all=True, append_images=frames[1:])  # animated: the first frame is read
    expected["g.gif"] = np.array((250, 0, 0))
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "h", format="PNG")  # no extension: opened by content
    expected["h"] = np.array((10, 200, 10))
    return expected


def test_every_format_pillow_opens_is_read(tmp_path):
    expected = _formats(tmp_path / "data")
    data, said = _read(tmp_path / "data", instance_prompt="a sks star")
    names = [p.name for p in data._instances[0]]
    assert names == sorted(expected)
    for name, image in zip(names, data.dataset.images):
        assert np.abs(np.asarray(image)[16, 16].astype(int) - expected[name]).max() <= 3, name  # AVIF is lossy
    assert said == []


def test_unsupported_and_skipped_files_are_named_and_all_listed_in_the_run_folder(tmp_path, capsys):
    import lightning as L

    folder = write_images(tmp_path / "data", 2)
    (folder / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))  # an iPhone photo
    (folder / "._img_00.png").write_bytes(b"\x00\x05\x16\x07 resource fork")  # macOS copy debris
    (folder / "raw").mkdir()
    for i in range(7):
        (folder / f"note_{i}.md").write_text("shot on a phone")
    assert classify(folder / "IMG_0001.heic") == "unsupported" and classify(folder / "._img_00.png") == "hidden"
    trainer = L.Trainer(logger=False, default_root_dir=str(tmp_path / "run"), accelerator="cpu")
    capsys.readouterr()
    data, said = _read(folder, trainer=trainer, instance_prompt="a sks star")
    assert said == [
        f"lightning-ft: data.instance_dir: '{folder}/IMG_0001.heic' is an image in a format Pillow cannot open "
        "(image/heic): skipped; convert it to PNG or JPEG, or install a Pillow plugin for the format"
    ]
    listing = tmp_path / "run" / "skipped_files.txt"
    out = capsys.readouterr().out
    assert (
        f"data.instance_dir: using 2 images from '{folder}'; skipped 1 subfolders (raw/), 1 images in a format Pillow "
        "cannot open (IMG_0001.heic), 1 hidden files (._img_00.png), 7 other files (note_0.md, note_1.md, note_2.md, "
        "note_3.md, note_4.md, ...)"
    ) in out
    where = f"lightning-ft: all 10 skipped entries of the data folders (files and subfolders) are listed in {listing}"
    assert where in out
    rows = listing.read_text().splitlines()
    assert rows[0] == "folder key\twhy\tpath" and len(rows) == 11
    assert f"data.instance_dir\tunsupported (image/heic)\t{folder}/IMG_0001.heic" in rows
    assert all(f"data.instance_dir\tother\t{folder}/note_{i}.md" in rows for i in range(7)), "not only the first 5"


def test_a_folder_of_only_unsupported_images_says_so(tmp_path):
    folder = tmp_path / "phone"
    folder.mkdir()
    for i in range(2):
        (folder / f"IMG_{i}.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    with pytest.raises(ValueError) as error:
        _read(folder, instance_prompt="a sks star")
    assert str(error.value) == (
        f"data.instance_dir: folder '{folder}' holds no image Pillow can read; found ['IMG_0.heic', 'IMG_1.heic']; 2 "
        "are images in a format Pillow cannot open (IMG_0.heic, IMG_1.heic): convert them to PNG or JPEG, or install "
        "a Pillow plugin for the format"
    )


# ------------------------------------------------------------------------------------ early, clear errors
class _Sampler:
    """Stands in for the model in setup: counts generate calls (none may happen before the errors)."""

    def __init__(self):
        self.calls, self.hparams = 0, {}
        self.family = SimpleNamespace(needs_labels=lambda: False, needs_source=False,
                                      sample_inputs=lambda prompts=None, labels=None, n=None, where="",
                                      required=True: SampleInputs.of(prompts=prompts))  # fmt: skip

    def to(self, device):
        return self

    def model_identity(self):
        return "fake-model"

    def generate(self, prompts=None, seeds=(), **kwargs):
        self.calls += 1
        return torch.full((len(seeds), 3, 32, 32), 0.5)


def _trainer(module):
    return SimpleNamespace(lightning_module=module, strategy=SimpleNamespace(root_device=torch.device("cpu")))


def test_a_corrupt_class_image_is_named_with_data_class_dir_before_any_sampling(tmp_path, subject_dir):
    classes = write_images(tmp_path / "cls", 3, seed=4)
    (classes / "img_01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    module = _Sampler()
    data = LimitedDataModule(str(subject_dir), instance_prompt="a sks star", class_dir=str(classes),
                             class_prompt="a star", num_class_images=5, class_cache_dir=str(tmp_path / "cache"),
                             resolution=32)  # fmt: skip
    with pytest.raises(ValueError) as error:
        data.check_inputs(module)  # what the CLI calls before anything is written
    assert str(error.value) == (
        f"data.class_dir: image '{classes}/img_01.png' cannot be read (UnidentifiedImageError: cannot identify image "
        f"file '{classes}/img_01.png')"
    )
    data.trainer = _trainer(module)
    with pytest.raises(ValueError, match="data.class_dir: image .*img_01.png' cannot be read"):
        data.setup("fit")
    assert module.calls == 0 and not (tmp_path / "cache").exists()


def test_an_unwritable_class_cache_names_the_path_the_key_and_the_variable(tmp_path, subject_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache folder should be")
    module = _Sampler()
    data = LimitedDataModule(str(subject_dir), instance_prompt="a sks star", class_prompt="a star",
                             num_class_images=2, class_cache_dir=str(blocker / "cache"), resolution=32)  # fmt: skip
    data.trainer = _trainer(module)
    with pytest.raises(CacheNotWritableError) as error:
        data.setup("fit")
    assert str(error.value) == (
        f"data.class_cache_dir: cannot write the cache folder '{blocker}/cache' (NotADirectoryError: Not a directory); "
        f"set data.class_cache_dir, or LIGHTNING_FT_CACHE (the root of lightning-ft's caches, now "
        f"'{cache_root()}'), to a writable folder"
    )
    assert module.calls == 0, "the cache is checked before any image is sampled"


def test_a_cache_without_write_permission_is_a_clear_error_not_one_on_a_partial_folder(tmp_path, monkeypatch):
    import lightning_ft.paths as paths

    def refused(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(dir) / ".write-test-x"))

    monkeypatch.setattr(paths.tempfile, "NamedTemporaryFile", refused)  # as a folder of another user, for root too
    module = _Sampler()
    with pytest.raises(CacheNotWritableError) as error:
        generate_memory_bank(module, tmp_path / "bank" / "k", SampleInputs(2))
    assert str(error.value).startswith(
        f"model.memory_cache_dir: cannot write the cache folder '{tmp_path}/bank' (PermissionError: Permission "
        "denied); set model.memory_cache_dir, or LIGHTNING_FT_CACHE (the root of lightning-ft's caches"
    )
    assert module.calls == 0 and ".partial" not in str(error.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_cache_folder_is_a_clear_error(tmp_path):
    from lightning_ft.paths import ensure_writable

    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(CacheNotWritableError, match="data.class_cache_dir: cannot write the cache folder .*ro/cache"):
        ensure_writable(tmp_path / "ro" / "cache", "data.class_cache_dir")


def test_a_cache_root_that_cannot_be_made_names_the_variable(tmp_path, monkeypatch):
    from lightning_ft.embedded.targets import ensure_target

    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LIGHTNING_FT_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(CacheNotWritableError) as error:
        ensure_target("subject")  # what ${embedded:subject} runs
    assert str(error.value) == (
        f"cannot write the cache folder '{tmp_path}/file/cache' (NotADirectoryError: Not a directory); set "
        f"LIGHTNING_FT_CACHE (the root of lightning-ft's caches, now '{tmp_path}/file/cache') to a writable folder"
    )


# ------------------------------------------------------------------------------------------ the run report
def test_the_report_shows_the_instance_images_as_they_are_trained_on(tmp_path):
    from lightning_ft.report import figures
    from lightning_ft.report.run_folder import RunFolder

    folder = tmp_path / "photos"
    folder.mkdir()
    # A phone photo stored sideways (left column red) with EXIF orientation 6: upright, the red column is on top.
    stored = np.zeros((32, 40, 3), np.uint8)
    stored[:, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "a_phone.jpg", exif=exif, quality=95)
    Image.fromarray(np.full((32, 32), 30000, np.uint16)).save(folder / "b_deep.png")  # 16-bit: 30000/257 = gray 117
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(folder / "c_clear.png")  # transparent black: trained as white
    Image.new("RGB", (32, 32), (0, 0, 200)).save(folder / "d_scan.tif")  # a format the report used to leave out
    run = RunFolder(path=tmp_path, config={"data": {"init_args": {"instance_dir": str(folder)}}})
    files, why = run.instance_images()
    assert [f.name for f in files] == ["a_phone.jpg", "b_deep.png", "c_clear.png", "d_scan.tif"] and why is None
    grid = tmp_path / "step_10.png"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(grid)
    png = figures.samples_figure([(10, grid)], files, None)
    figure = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    cell = 32  # 2 x 2 instance images of 32 px beside a 64 px grid; the block starts 18 px in, 64 px down
    x0, y0 = 18, 64
    phone = figure[y0 : y0 + cell, x0 : x0 + cell]
    assert phone[1, 16, 0] > 150 and phone[16, 1, 0] < 100, "upright: red along the top, not down the left"
    deep = figure[y0 + 16, x0 + cell + 16]
    assert np.abs(deep - 117).max() <= 2, deep
    clear = figure[y0 + cell + 16, x0 + 16]
    assert (clear >= 250).all(), clear
    assert np.abs(figure[y0 + cell + 16, x0 + cell + 16] - (0, 0, 200)).max() <= 2
    assert np.array_equal(np.asarray(load_image(folder / "b_deep.png"))[0, 0], (117, 117, 117))
