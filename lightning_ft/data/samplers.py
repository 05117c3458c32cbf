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


class EpochOrder:
    """The iterator of one epoch's order, with the state ``StatefulDataLoader`` saves for it (torchdata serialises
    a sampler's iterator through ``state_dict`` / ``load_state_dict``): the epoch and how many indices were given.
    A resumed run builds its loader's iterator before Lightning calls ``set_epoch``; loading this state re-draws the
    saved epoch's order, so a run resumed in any epoch continues exactly where the unbroken one was."""

    def __init__(self, length: int, seed: int, epoch: int):
        self.length, self.seed = length, seed
        self._start(epoch, 0)

    def _start(self, epoch: int, yielded: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self.epoch, self.yielded = epoch, yielded
        self.order = torch.randperm(self.length, generator=generator).tolist()

    def __iter__(self) -> EpochOrder:
        return self

    def __next__(self) -> int:
        if self.yielded >= self.length:
            raise StopIteration
        self.yielded += 1
        return self.order[self.yielded - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self._start(int(state["epoch"]), int(state["yielded"]))


class EpochSeededRandomSampler(Sampler[int]):
    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        return EpochOrder(self.length, self.seed, self.epoch)
