"""LimitedDataModule: captions, prior-preservation batches, class-image cache, determinism, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import tiny_module, write_images
from PIL import Image

from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.data import LimitedDataModule
from lightning_ft.data.class_images import generate_class_images
from lightning_ft.data.folder import load_image


def _setup(**kwargs):
    data = LimitedDataModule(resolution=32, **kwargs)
    data.setup("fit")
    return data


def test_captions_from_txt_jsonl_csv_and_prompt(tmp_path):
    folder = write_images(tmp_path / "a", 3, captions=True)
    data = _setup(instance_dir=str(folder))
    assert data.dataset.prompts[0].startswith("a ") and "background" in data.dataset.prompts[0]

    plain = write_images(tmp_path / "b", 2)
    rows = [{"file": "img_00.png", "caption": "first"}, {"file": "img_01.png", "caption": "second"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert _setup(instance_dir=str(plain), captions_file=str(tmp_path / "c.jsonl")).dataset.prompts == [
        "first",
        "second",
    ]
    (tmp_path / "c.csv").write_text("file,caption\nimg_01.png,two\nimg_00.png,one\n")
    assert _setup(instance_dir=str(plain), captions_file=str(tmp_path / "c.csv")).dataset.prompts == ["one", "two"]
    assert _setup(instance_dir=str(plain), instance_prompt="a sks star").dataset.prompts == ["a sks star"] * 2


def test_epoch_repeats_instances_and_is_deterministic_per_seed(subject_dir):
    data = _setup(instance_dir=str(subject_dir), instance_prompt="x", repeats=5, random_flip=True, center_crop=False)
    assert len(data.dataset) == 15
    again = _setup(instance_dir=str(subject_dir), instance_prompt="x", repeats=5, random_flip=True, center_crop=False)
    assert all(torch.equal(data.dataset[i]["pixel_values"], again.dataset[i]["pixel_values"]) for i in range(15))
    order = lambda d: [b["pixel_values"].sum().item() for b in d.train_dataloader()]  # noqa: E731
    assert order(data) == order(again)
    other = _setup(
        instance_dir=str(subject_dir), instance_prompt="x", repeats=5, random_flip=True, center_crop=False, seed=1
    )
    assert order(data) != order(other)


class _CountingGenerator:
    """Stands in for the model: counts generate() calls and returns flat images."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, seeds, batch_size=16, **sampler):
        self.calls += 1
        return torch.stack([torch.full((3, 32, 32), (s % 7) / 7) for s in seeds])

    def model_identity(self):
        return "fake-model"


def test_prior_preservation_batches_hold_instance_and_class_halves(subject_dir, tmp_path):
    class_dir = write_images(tmp_path / "cls", 4, seed=5)
    data = _setup(
        instance_dir=str(subject_dir),
        instance_prompt="a sks star",
        class_dir=str(class_dir),
        class_prompt="a star",
        num_class_images=4,
        batch_size=2,
        repeats=1,
    )
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == batch["class_pixel_values"].shape == (2, 3, 32, 32)
    assert batch["prompts"] == ["a sks star"] * 2 and batch["class_prompts"] == ["a star"] * 2
    assert len(data.dataset) == 4  # max(instances x repeats, class images)


def test_class_images_are_generated_once_and_cached(subject_dir, tmp_path):
    fake = _CountingGenerator()
    folder = tmp_path / "cache" / "k"
    generate_class_images(fake, SampleInputs.of(prompts=["a star"] * 5), folder)
    generate_class_images(fake, SampleInputs.of(prompts=["a star"] * 5), folder)
    assert fake.calls == 1 and len(list(folder.glob("*.png"))) == 5
    assert [p.name for p in folder.parent.iterdir()] == ["k"]  # no partial folder left


def test_two_jobs_sampling_the_same_class_images_at_once_both_succeed(tmp_path):
    """Two runs of one model sharing a cache: while this job samples, another finishes the same folder first. This
    one keeps the other's (identical, seeded) images and leaves no partial folder, instead of failing."""
    folder = tmp_path / "cache" / "k"

    class OtherJobFinishesFirst(_CountingGenerator):
        def generate(self, *args, **kwargs):
            images = super().generate(*args, **kwargs)
            if not folder.exists():
                # the other job, start to end
                generate_class_images(_CountingGenerator(), SampleInputs.of(prompts=["a star"] * 3), folder)
            return images

    generate_class_images(OtherJobFinishesFirst(), SampleInputs.of(prompts=["a star"] * 3), folder)
    assert sorted(p.name for p in folder.glob("*.png")) == [f"class_{i:06d}.png" for i in range(3)]
    assert [p.name for p in folder.parent.iterdir()] == ["k"]


def test_datamodule_generates_missing_class_images_with_the_model(subject_dir, tmp_path):
    import lightning as L

    module = tiny_module()
    calls = []
    original = module.generate
    module.generate = lambda **kw: calls.append(len(kw["prompts"])) or original(**kw)
    cache = tmp_path / "classcache"
    for _ in range(2):
        data = LimitedDataModule(
            str(subject_dir),
            instance_prompt="a sks star",
            class_prompt="a star",
            num_class_images=3,
            class_cache_dir=str(cache),
            resolution=32,
            batch_size=1,
        )
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False)
        trainer.fit(module, data)
        assert len(data.dataset.class_images) == 3
    assert calls == [3], "the second run reuses the cache"


def test_bad_inputs_name_the_file_or_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.instance_dir: folder .*nowhere"):
        _setup(instance_dir=str(tmp_path / "nowhere"), instance_prompt="x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("hi")
    with pytest.raises(ValueError, match="holds no image.*notes.md"):
        _setup(instance_dir=str(tmp_path / "empty"), instance_prompt="x")

    broken = write_images(tmp_path / "broken", 2)
    (broken / "img_01.png").write_bytes((broken / "img_01.png").read_bytes()[:60])
    with pytest.raises(ValueError, match="img_01.png' cannot be read"):
        _setup(instance_dir=str(broken), instance_prompt="x")

    odd = write_images(tmp_path / "odd", 1)
    # A float TIFF saved under a .png name: PIL reads it by content, as mode 'F', which has no RGB meaning.
    Image.fromarray(np.zeros((32, 32), np.float32), mode="F").save(odd / "img_09.png", format="TIFF")
    with pytest.raises(ValueError, match="img_09.png' has mode 'F'"):
        _setup(instance_dir=str(odd), instance_prompt="x")

    folder = write_images(tmp_path / "caps", 2)
    (tmp_path / "caps.csv").write_text("img_00.png,one\nghost.png,two\n")
    with pytest.raises(ValueError, match="names images not in the folder: \\['ghost.png'\\]"):
        _setup(instance_dir=str(folder), captions_file=str(tmp_path / "caps.csv"))
    (tmp_path / "few.csv").write_text("img_00.png,one\n")
    with pytest.raises(ValueError, match="no caption for \\['img_01.png'\\]"):
        _setup(instance_dir=str(folder), captions_file=str(tmp_path / "few.csv"))
    (folder / "img_00.txt").write_text("only one")
    with pytest.raises(ValueError, match="these have none: \\['img_01.png'\\]"):
        _setup(instance_dir=str(folder))
    with pytest.raises(FileNotFoundError, match="data.class_dir: folder .*typo"):
        clean = str(write_images(tmp_path / "clean", 1))
        _setup(instance_dir=clean, instance_prompt="x", class_dir=str(tmp_path / "typo"), class_prompt="a",
               num_class_images=2)  # fmt: skip
    with pytest.raises(ValueError, match="needs data.class_prompt"):
        LimitedDataModule(str(folder), instance_prompt="x", num_class_images=3)
    # An experiment without its data config: checked first, naming the data configs.
    with pytest.raises(ValueError, match=r"data.instance_dir is missing: give a data config: configs/data/"):
        LimitedDataModule(instance_prompt="", num_class_images=3)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    folder = tmp_path / "deep"
    folder.mkdir()
    Image.fromarray(np.full((32, 32), 65535, np.uint16)).save(folder / "a.png")
    data = _setup(instance_dir=str(folder), instance_prompt="x")
    assert torch.allclose(data.dataset[0]["pixel_values"], torch.ones(3, 32, 32))


def test_resolution_the_model_cannot_take_fails_before_training(subject_dir):
    module = tiny_module()
    with pytest.raises(ValueError, match="data.resolution=34 is not a multiple of 4"):
        module.check_resolution(34)
    with pytest.raises(ValueError, match="data.resolution=256 is over 4x"):
        module.check_resolution(256)
    module.check_resolution(64)


def test_captions_csv_with_byte_order_mark_and_blank_lines(tmp_path):
    folder = write_images(tmp_path / "a", 2)
    # Excel's "CSV UTF-8" starts with a byte-order mark; editors leave blank lines, e.g. a trailing one.
    (tmp_path / "c.csv").write_bytes("\ufefffile,caption\nimg_00.png,one\n\nimg_01.png,two\n\n".encode())
    assert _setup(instance_dir=str(folder), captions_file=str(tmp_path / "c.csv")).dataset.prompts == ["one", "two"]
    rows = [{"file": "img_00.png", "caption": "first"}, {"file": "img_01.png", "caption": "second"}]
    (tmp_path / "c.jsonl").write_bytes(("\ufeff" + "\n".join(json.dumps(r) for r in rows)).encode())
    prompts = _setup(instance_dir=str(folder), captions_file=str(tmp_path / "c.jsonl")).dataset.prompts
    assert prompts == ["first", "second"]


class _PromptFamily:
    """A text model's family, as far as the data module asks it: class images are asked with the class prompt."""

    def sample_inputs(self, prompts=None, labels=None, n=None, where="", required=True):
        return SampleInputs.of(prompts=prompts)


class _Generator(_CountingGenerator):
    family = _PromptFamily()

    def __init__(self, **hparams):
        super().__init__()
        self.hparams, self.device, self.device_at_generate = hparams, torch.device("cpu"), None

    def to(self, device):
        self.device = device
        return self

    def generate(self, prompts, seeds, batch_size=16, **sampler):
        self.device_at_generate = self.device
        return super().generate(prompts, seeds, batch_size, **sampler)


def _with_fake_trainer(data, module, device="cpu"):
    from types import SimpleNamespace

    data.trainer = SimpleNamespace(lightning_module=module, strategy=SimpleNamespace(root_device=torch.device(device)))
    return data


def test_class_image_cache_key_changes_with_the_sampling_settings(subject_dir, tmp_path):
    def folder(**hparams):
        data = LimitedDataModule(
            str(subject_dir), instance_prompt="a sks star", class_prompt="a star", num_class_images=2,
            class_cache_dir=str(tmp_path), resolution=32,
        )  # fmt: skip
        return _with_fake_trainer(data, _Generator(**hparams))._generated_class_folder()

    assert folder(sample_steps=2, guidance_scale=3.0) == folder(sample_steps=2, guidance_scale=3.0)
    assert folder(sample_steps=2, guidance_scale=3.0) != folder(sample_steps=50, guidance_scale=3.0)
    assert folder(sample_steps=2, guidance_scale=3.0) != folder(sample_steps=2, guidance_scale=7.5)


def test_class_images_are_sampled_on_the_strategy_device(subject_dir, tmp_path):
    # setup runs before the strategy moves the model: without a move, SD class images are sampled on the CPU.
    module = _Generator()
    data = LimitedDataModule(
        str(subject_dir), instance_prompt="a sks star", class_prompt="a star", num_class_images=2,
        class_cache_dir=str(tmp_path), resolution=32,
    )  # fmt: skip
    data = _with_fake_trainer(data, module, device="meta")
    data._sample_class_images(data._generated_class_folder())
    assert module.calls == 1 and module.device_at_generate == torch.device("meta")


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 32 high, left column red, with EXIF orientation 6 ("rotate 90 degrees clockwise to view"),
    # as a phone held upright writes it: upright, the image is 32 x 40 with the red column on top.
    stored = np.zeros((32, 40, 3), np.uint8)
    stored[:, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)  # PNG: no JPEG colour bleed at the edge
    image = load_image(tmp_path / "phone.png")
    assert image.size == (32, 40)
    top, left = np.asarray(image)[0], np.asarray(image)[:, 0]
    assert (top[:, 0] > 200).all() and (top[:, 1:] < 60).all()
    assert (left[1:, 0] < 60).all()


def test_every_unreadable_image_is_named_at_once_and_skipped_files_are_reported(tmp_path, capsys):
    folder = write_images(tmp_path / "mixed", 3)
    (folder / "broken_a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "broken_b.jpg").write_bytes(b"nothing")
    (folder / "raw").mkdir()
    (folder / "notes.md").write_text("shot on a phone")
    with pytest.raises(ValueError) as error:
        _setup(instance_dir=str(folder), instance_prompt="x")
    message = str(error.value)
    assert "data.instance_dir: 2 of 5 images cannot be used" in message
    assert "broken_a.png" in message and "broken_b.jpg" in message
    (folder / "broken_a.png").unlink()
    (folder / "broken_b.jpg").unlink()
    capsys.readouterr()
    _setup(instance_dir=str(folder), instance_prompt="x")
    line = capsys.readouterr().out
    assert "using 3 images" in line and "raw/" in line and "notes.md" in line


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"instance_prompt": ""}, "data.instance_prompt='' is empty"),
        ({"instance_prompt": "x", "num_class_images": -3}, "data.num_class_images=-3"),
        ({"instance_prompt": "x", "batch_size": 0}, "data.batch_size=0"),
        ({"instance_prompt": "x", "num_workers": -1}, "data.num_workers=-1"),
    ],
)
def test_nonsense_settings_fail_at_construction_naming_key_and_value(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LimitedDataModule(str(tmp_path / "not-read-yet"), **kwargs)


def test_pinned_memory_is_on_for_cuda_trainers_only_unless_set(tmp_path):
    from types import SimpleNamespace

    folder = write_images(tmp_path / "data", 2)
    auto = LimitedDataModule(str(folder), instance_prompt="a sks star", resolution=32)
    auto.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    assert auto.pin_memory() is False
    auto.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert auto.pin_memory() is True
    forced = LimitedDataModule(str(folder), instance_prompt="a sks star", resolution=32, pin_memory=False)
    forced.trainer = auto.trainer
    assert forced.pin_memory() is False
    forced.trainer = None
    forced.setup("fit")
    assert forced.train_dataloader().pin_memory is False


def test_a_resumed_loader_continues_the_saved_epochs_order_in_any_epoch():
    """The loader of a resumed run is built (and its iterator made) before Lightning sets the sampler's epoch: the
    saved state must carry the epoch, or a run resumed in epoch 1 would replay epoch 0's order."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from lightning_ft.data.samplers import EpochSeededRandomSampler

    sampler = EpochSeededRandomSampler(6, seed=3)
    sampler.set_epoch(1)
    unbroken = [b.tolist() for b in StatefulDataLoader(list(range(6)), batch_size=2, sampler=sampler)]
    loader = StatefulDataLoader(list(range(6)), batch_size=2, sampler=sampler)
    iterator = iter(loader)
    first = next(iterator).tolist()
    state = loader.state_dict()
    resumed = StatefulDataLoader(list(range(6)), batch_size=2, sampler=EpochSeededRandomSampler(6, seed=3))
    resumed.load_state_dict(state)  # a fresh sampler, still at epoch 0
    assert [first, *[b.tolist() for b in resumed]] == unbroken
    epoch0 = [b.tolist() for b in StatefulDataLoader(list(range(6)), batch_size=2,
                                                       sampler=EpochSeededRandomSampler(6, seed=3))]  # fmt: skip
    assert epoch0 != unbroken
