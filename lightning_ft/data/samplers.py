"""A shuffling sampler whose order depends on (seed, epoch) only, for exactly resumable training.

``RandomSampler`` with a generator draws each epoch's order from the generator's running state, which a run
resumed in a new process does not have; this sampler draws epoch ``e``'s permutation from a generator seeded with
``(seed, e)``, and Lightning calls ``set_epoch`` on it each epoch (as it does for ``DistributedSampler``, which
replaces it under DDP and follows the same rule). Together with ``StatefulDataLoader``, which records how far into
the epoch a checkpoint was taken, a resumed run sees exactly the batches the unbroken run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSeededRandomSampler(Sampler[int]):
    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())
