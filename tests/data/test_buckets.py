"""Aspect-ratio buckets and several resolutions: images of three aspect ratios go to their buckets undistorted, every
batch is from one bucket, the sampler is seeded, resumable and DDP-safe, and sizes the model cannot take are named."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_module
from lightning.pytorch.utilities.data import _update_dataloader
from PIL import Image, ImageDraw
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_ft.data import LimitedDataModule
from lightning_ft.data.buckets import BucketBatchSampler, bucket_sizes, nearest_bucket
from lightning_ft.data.samplers import EpochSeededRandomSampler

#: (width, height) of the test images: landscape 2:1, square, portrait 1:2.
SHAPES = {"wide": (128, 64), "square": (96, 96), "tall": (64, 128)}


def _disc_image(size: tuple[int, int]) -> Image.Image:
    """A gray image with a red disc of diameter 0.4 x the short side in its centre: any distortion makes it an
    ellipse."""
    image = Image.new("RGB", size, (128, 128, 128))
    w, h = size
    r = 0.2 * min(w, h)
    ImageDraw.Draw(image).ellipse((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=(230, 20, 20))
    return image


@pytest.fixture
def aspect_dir(tmp_path):
    folder = tmp_path / "aspect"
    folder.mkdir()
    for name, size in SHAPES.items():
        _disc_image(size).save(folder / f"{name}.png")
    return folder


def _module(folder, **kwargs) -> LimitedDataModule:
    settings = dict(instance_dir=str(folder), instance_prompt="a sks disc", resolution=64, aspect_buckets=True,
                    bucket_step=16, repeats=4, batch_size=2)  # fmt: skip
    data = LimitedDataModule(**{**settings, **kwargs})
    data.setup("fit")
    return data


def test_derived_buckets_follow_the_kohya_convention():
    for resolution, step in [(512, 64), (1024, 64), (64, 16)]:
        sizes = bucket_sizes(resolution, step)
        assert (resolution, resolution) in sizes
        for w, h in sizes:
            assert w % step == 0 and h % step == 0
            assert w * h <= resolution * resolution
            assert max(w / h, h / w) <= 4.0
            assert (h, w) in sizes  # both orientations
            # the largest height of its width, or (the mirrored ones) the largest width of its height
            area = resolution * resolution
            assert w * (h + step) > area or (h + step) / w > 4.0 or (w + step) * h > area
    assert bucket_sizes(512, 64, max_aspect=1.0) == [(512, 512)]
    assert nearest_bucket((128, 64), bucket_sizes(64, 16)) == (80, 48)  # 2:1 -> 5:3, the nearest in log ratio
    assert nearest_bucket((64, 128), bucket_sizes(64, 16)) == (48, 80)


def test_three_aspect_ratios_train_in_their_buckets_without_distortion(aspect_dir):
    data = _module(aspect_dir)
    files = [p.name for p in data._instances[0]]
    expected = {name: nearest_bucket(SHAPES[name.removesuffix(".png")], bucket_sizes(64, 16)) for name in files}
    assert sorted(set(expected.values())) == [(48, 80), (64, 64), (80, 48)]
    for index in range(len(files)):
        item = data.dataset[index]
        name = files[index]
        w, h = expected[name]
        assert tuple(item["pixel_values"].shape) == (3, h, w), name
        assert item["original_size"].tolist() == list(reversed(SHAPES[name.removesuffix(".png")]))
        # The disc stays round: its red pixels span as many rows as columns (a stretched resize makes an ellipse).
        red = ((item["pixel_values"][0] > 0.5) & (item["pixel_values"][1] < -0.5)).numpy()
        rows, cols = np.nonzero(red.any(axis=1))[0], np.nonzero(red.any(axis=0))[0]
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert abs(height - width) <= 1, (name, height, width)
    # What a square resize of the wide image (the distortion the buckets avoid) would have given, for contrast:
    squashed = np.asarray(_disc_image(SHAPES["wide"]).resize((64, 64)))
    red = (squashed[..., 0] > 191) & (squashed[..., 1] < 64)
    assert red.any(axis=0).sum() < red.any(axis=1).sum() - 5

    # Every training batch holds one bucket's views, and an epoch holds every item once.
    seen = []
    for batch in data.train_dataloader():
        sizes = {tuple(p.shape[-2:]) for p in batch["pixel_values"]}
        assert len(sizes) == 1
        assert tuple(batch["pixel_values"].shape[-2:]) == tuple(batch["mask"].shape[-2:]) if "mask" in batch else True
        seen += [tuple(batch["pixel_values"].shape[-2:])] * len(batch["pixel_values"])
    assert len(seen) == len(data.dataset) == 3 * 4
    assert sorted(set(seen)) == sorted({(h, w) for w, h in expected.values()})


def test_several_resolutions_make_a_view_of_each_image_at_each(aspect_dir):
    data = _module(aspect_dir, resolution=[32, 64], aspect_buckets=False, repeats=1)
    sizes = sorted(data.dataset.size_of(i) for i in range(len(data.dataset)))
    assert sizes == [(32, 32)] * 3 + [(64, 64)] * 3
    assert data.sampling_resolution == 64
    shapes = {tuple(b["pixel_values"].shape[-2:]) for b in data.train_dataloader()}
    assert shapes == {(32, 32), (64, 64)}
    # Validation: every view once, in order, one bucket per batch.
    val = [tuple(b["pixel_values"].shape) for b in data.val_dataloader()]
    assert sum(s[0] for s in val) == 6 and all(len(set(s[-2:])) == 1 for s in val)


def test_class_images_are_cropped_to_their_instance_view(aspect_dir, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(2):
        _disc_image((72, 72)).save(class_dir / f"c{i}.png")
    data = _module(aspect_dir, class_dir=str(class_dir), class_prompt="a disc", num_class_images=2)
    for index in range(len(data.dataset)):
        item = data.dataset[index]
        assert item["class_pixel_values"].shape == item["pixel_values"].shape
    for batch in data.train_dataloader():
        assert batch["class_pixel_values"].shape == batch["pixel_values"].shape


def _batches(loader) -> list[list[int]]:
    return [list(b) for b in loader]


def test_the_bucket_sampler_is_seeded_per_epoch_and_resumes_exactly():
    sizes = [(64, 64), (80, 48), (48, 80)] * 7
    order = EpochSeededRandomSampler(len(sizes), seed=5)

    def loader(sampler):
        return StatefulDataLoader(list(range(len(sizes))), batch_sampler=sampler, collate_fn=list)

    sampler = BucketBatchSampler(order, 4, False, sizes, seed=5)
    epoch0 = _batches(loader(sampler))
    assert sorted(i for b in epoch0 for i in b) == list(range(len(sizes)))
    assert all(len({sizes[i] for i in b}) == 1 for b in epoch0)
    assert _batches(loader(BucketBatchSampler(EpochSeededRandomSampler(len(sizes), 5), 4, False, sizes, 5))) == epoch0
    order.set_epoch(1)  # Lightning sets the epoch on the batch sampler's sampler
    epoch1 = _batches(loader(sampler))
    assert epoch1 != epoch0 and sorted(map(sorted, epoch1)) != sorted(map(sorted, epoch0))

    # Resume in epoch 1 after two batches, with a fresh sampler still at epoch 0 (as a resumed run builds it).
    first = loader(sampler)
    iterator = iter(first)
    taken = [next(iterator), next(iterator)]
    state = first.state_dict()
    resumed = loader(BucketBatchSampler(EpochSeededRandomSampler(len(sizes), 5), 4, False, sizes, 5))
    resumed.load_state_dict(state)
    assert [*taken, *_batches(resumed)] == epoch1


def test_under_ddp_lightning_hands_the_ranks_disjoint_equal_shares(aspect_dir):
    """Lightning re-creates the train loader with a DistributedSampler under DDP (``_update_dataloader``, as its data
    connector does); the bucket sampler reads the rank from it: the ranks' batches are disjoint, as many on each,
    and together every batch of the epoch."""
    data = _module(aspect_dir, repeats=5, batch_size=2)
    with torch.no_grad():
        from lightning.fabric.utilities.data import _replace_dunder_methods
        from torch.utils.data import BatchSampler, DataLoader

        with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
            loader = data.train_dataloader()
    single = loader.batch_sampler.all_batches(0)
    shares = []
    for rank in range(2):
        distributed = DistributedSampler(data.dataset, num_replicas=2, rank=rank, shuffle=False)
        updated = _update_dataloader(loader, distributed)
        assert isinstance(updated, StatefulDataLoader)
        assert (updated.batch_sampler.rank, updated.batch_sampler.world) == (rank, 2)
        shares.append(list(updated.batch_sampler))
    assert len(shares[0]) == len(shares[1]) == math.ceil(len(single) / 2)
    padded = len(shares[0]) * 2 - len(single)
    assert sorted(map(tuple, shares[0] + shares[1])) == sorted(map(tuple, single + single[:padded]))
    for batch in shares[0] + shares[1]:
        assert len({data.dataset.size_of(i) for i in batch}) == 1


def test_latent_cache_counts_the_bucket_views(aspect_dir):
    data = _module(aspect_dir, center_crop=True, random_flip=True)
    assert data.dataset.distinct_views() == 3 * 2  # one centre crop of each view, flipped or not


def test_sizes_the_model_cannot_take_are_named(aspect_dir):
    module = tiny_module()  # its denoiser needs sides that are multiples of 4
    data = LimitedDataModule(instance_dir=str(aspect_dir), instance_prompt="a sks disc", resolution=32,
                             buckets=[[32, 32], [42, 24]])  # fmt: skip
    with pytest.raises(ValueError, match=r"data.buckets: buckets 42x24 .* multiples of 4"):
        data.check_inputs(module)
    data = LimitedDataModule(instance_dir=str(aspect_dir), instance_prompt="a sks disc", resolution=32,
                             aspect_buckets=True)  # fmt: skip
    data.check_inputs(module)
    assert data.bucket_step(module) == 16  # latent factor 2 x 8, a multiple of the denoiser's 4
    dit = tiny_module(model="tiny_dit")
    data = LimitedDataModule(instance_dir=str(aspect_dir), instance_prompt="a sks disc", resolution=32,
                             aspect_buckets=True, class_label=0)  # fmt: skip
    with pytest.raises(ValueError, match="fixed positional grid"):
        data.check_inputs(dit)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"resolution": [64, 0]}, r"data.resolution=\[64, 0\]"),
        ({"resolution": []}, r"data.resolution=\[\]"),
        ({"buckets": [[64, 64], [64]]}, r"data.buckets: \[64\]"),
        ({"buckets": [[64, 64]], "resolution": [32, 64]}, "data.buckets and data.resolution"),
        ({"bucket_step": 0}, "data.bucket_step=0"),
        ({"bucket_max_aspect": 0.5}, "data.bucket_max_aspect=0.5"),
    ],
)
def test_nonsense_bucket_settings_fail_naming_the_key(aspect_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LimitedDataModule(instance_dir=str(aspect_dir), instance_prompt="a sks disc", **kwargs)
