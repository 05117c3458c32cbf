"""Aspect-ratio buckets and several resolutions: every batch holds views of one size, and no image is distorted.

The convention is kohya sd-scripts' and the diffusers scripts that bucket: a bucket is a (w, h) of about the pixel
count of ``resolution`` squared, both sides multiples of a step (the model's latent factor x 8, 64 for SD/SDXL/Flux);
an image goes to the bucket of its resolution whose aspect ratio is nearest to its own (in log ratio: a 2:1 and a 1:2
image are equally far from a square), is resized with its aspect kept until it covers the bucket, and cropped to it.
With several resolutions every image is a view at each of them (SimpleTuner's and ai-toolkit's multi-resolution
datasets).

``BucketBatchSampler`` draws an epoch's batches from ``(seed, epoch)`` only, as ``EpochSeededRandomSampler`` draws
its order: each bucket's items shuffled and cut into batches, then the batches shuffled. Its iterator saves the
epoch and how many batches it gave, so ``StatefulDataLoader`` resumes it exactly. Under DDP, Lightning hands it a
``DistributedSampler`` (see ``__init__``): every rank draws the same batch list and takes every ``world``-th batch,
padded by repeating the first so every rank steps the same number of times.

No maintained library does this for a map-style dataset with exact resume (torchdata's samplers have no buckets,
and the tools that bucket build them into their own trainers), so it is written here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

#: The widest aspect ratio a derived bucket may have (kohya's default bucket range at 512 px, 256 to 1024, is 4:1).
MAX_ASPECT = 4.0


def bucket_sizes(resolution: int, step: int, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """The buckets of one resolution: every (w, h) with sides multiples of ``step`` whose area is at most
    ``resolution**2`` and the largest such for its width, with an aspect ratio up to ``max_aspect``; sorted by
    aspect ratio (w / h). The square ``resolution`` x ``resolution`` is always one of them when it is a multiple of
    ``step``."""
    if step <= 0 or resolution < step:
        raise ValueError(f"data.bucket_step={step}: must be > 0 and at most data.resolution={resolution}")
    area = resolution * resolution
    sizes = set()
    for w in range(step, area // step + 1, step):
        h = (area // w) // step * step
        if h < step:
            break
        if max(w / h, h / w) <= max_aspect + 1e-9:
            sizes.update({(w, h), (h, w)})  # both orientations, as kohya's buckets
    return sorted(sizes, key=lambda size: size[0] / size[1])


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to that of an image of ``size`` (w, h), in log ratio."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def parse_buckets(value, key: str = "data.buckets") -> list[tuple[int, int]]:
    """A list of buckets given in a config (``[[w, h], ...]``), checked."""
    sizes = []
    for entry in value:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(v, int) and v > 0
                                                                            for v in entry)):  # fmt: skip
            raise ValueError(f"{key}: {entry!r} is not a bucket [width, height] of two positive integers")
        sizes.append((int(entry[0]), int(entry[1])))
    if not sizes:
        raise ValueError(f"{key}=[]: give at least one bucket [width, height], or set data.aspect_buckets=false")
    return sizes


class EpochBatches:
    """The iterator of one epoch's batches for one rank, with the state ``StatefulDataLoader`` saves for it: the
    epoch and how many batches were given (see ``samplers.EpochOrder``, its one-index counterpart)."""

    def __init__(self, sampler: BucketBatchSampler, epoch: int):
        self.sampler = sampler
        self._start(epoch, 0)

    def _start(self, epoch: int, yielded: int) -> None:
        self.epoch, self.yielded = epoch, yielded
        self.batches = self.sampler.batches(epoch)

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> list[int]:
        if self.yielded >= len(self.batches):
            raise StopIteration
        self.yielded += 1
        return self.batches[self.yielded - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self._start(int(state["epoch"]), int(state["yielded"]))


class BucketBatchSampler(BatchSampler):
    """Batches of dataset indices that share a bucket (``bucket_of[i]``: any hashable, e.g. a (w, h)).

    Args:
        sampler: a sampler over the dataset whose ``epoch`` is the epoch drawn (Lightning calls ``set_epoch`` on a
            batch sampler's ``sampler``, not on the batch sampler): ``EpochSeededRandomSampler`` in one process, the
            ``DistributedSampler`` Lightning passes in when it re-creates this sampler under DDP (its rank and
            replica count are read too). Its order is not used.
        batch_size: items per batch (a bucket's last batch may hold fewer, as kohya's do).
        drop_last: drop each bucket's last batch when it is short.
        bucket_of: the bucket of every dataset index.
        seed: the order's seed.
        shuffle: shuffle (training) or keep the dataset's order within buckets and the buckets' order (evaluation).
    """

    def __init__(
        self,
        sampler: Sampler | None,
        batch_size: int,
        drop_last: bool,
        bucket_of: Sequence = (),
        seed: int = 0,
        shuffle: bool = True,
    ):
        # Not BatchSampler.__init__: it requires a sampler, and the order here is this class's own.
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.bucket_of, self.seed, self.shuffle = list(bucket_of), seed, shuffle
        if isinstance(sampler, DistributedSampler):
            self.rank, self.world = sampler.rank, sampler.num_replicas
        else:
            self.rank, self.world = 0, 1

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch``, in order."""
        groups: dict = {}
        for index, bucket in enumerate(self.bucket_of):
            groups.setdefault(bucket, []).append(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in sorted(groups, key=str):  # a fixed order of buckets, whatever the dataset's
            members = groups[bucket]
            if self.shuffle:
                members = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``: every ``world``-th, the list padded by repeating its first batches so
        every rank gets as many (as ``DistributedSampler`` pads)."""
        batches = self.all_batches(epoch)
        if self.world == 1 or not batches:
            return batches
        per_rank = math.ceil(len(batches) / self.world)
        padded = (batches * math.ceil(per_rank * self.world / len(batches)))[: per_rank * self.world]
        return padded[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        return EpochBatches(self, self.epoch)


def resolution_list(value) -> list[int]:
    """``data.resolution`` as a list of sides (one, or several), in the order given, without repeats."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(values))


def build_views(
    sizes: Sequence[tuple[int, int]],
    resolutions: Sequence[int],
    aspect: bool,
    explicit: Sequence[tuple[int, int]] | None,
    step: int,
    max_aspect: float,
) -> list[tuple[int, tuple[int, int]]]:
    """``(image index, (w, h))`` of every training view of images of ``sizes`` (w, h): with ``explicit`` buckets,
    each image once in the nearest of them; else each image at every resolution, in the nearest of that
    resolution's buckets (``aspect``) or as a square."""
    if explicit:
        return [(i, nearest_bucket(size, explicit)) for i, size in enumerate(sizes)]
    views = []
    for resolution in resolutions:
        buckets = bucket_sizes(resolution, step, max_aspect) if aspect else [(resolution, resolution)]
        views += [(i, nearest_bucket(size, buckets)) for i, size in enumerate(sizes)]
    return views


def describe_buckets(views: Sequence[tuple[int, tuple[int, int]]], images: int) -> str:
    """One line: how many views of how many images fall in which bucket, the fullest first."""
    counts: dict[tuple[int, int], int] = {}
    for _, size in views:
        counts[size] = counts.get(size, 0) + 1
    listed = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{len(views)} views of {images} images in {len(counts)} buckets: {listed}"
