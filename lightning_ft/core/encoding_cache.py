"""Memoise the outputs of frozen encoders (VAE, text encoder) across steps.

Few-shot fine-tuning shows the same handful of images and prompts thousands of times; when the VAE and text
encoder are frozen their outputs never change, so computing them once saves most of their cost. Keys are the
content itself (prompt strings, image bytes), so augmentation, shuffling and workers need no bookkeeping: an
augmented view that differs is simply another key. No maintained library does this for LightningModules.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch


def tensor_key(tensor: torch.Tensor) -> bytes:
    return hashlib.blake2b(tensor.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


class EncodingCache:
    """A bounded least-recently-used map from keys to tensors.

    Args:
        max_items: entries kept (default 50,000); the least recently used are dropped beyond it.
    """

    def __init__(self, max_items: int = 50_000):
        self.max_items = max_items
        self.store: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.store)

    def lookup(self, keys: Sequence[Hashable], compute: Callable[[list[int]], torch.Tensor | dict]):
        """Stack the values of ``keys``; ``compute(indices)`` returns the values of the given (missing) ones, in
        order: a tensor (batch on dim 0), or a dict of such tensors (then a dict of stacked tensors is returned). It is
        called once per distinct missing key, with one index."""
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        first_seen = {}
        for i in missing:
            first_seen.setdefault(keys[i], i)
        unique = list(first_seen.values())
        for i in unique:
            # One input at a time: kernels can round differently at another batch size, and a value must not depend
            # on which other inputs it happened to be computed with (a resumed run starts with an empty cache and
            # meets the inputs in other groups; its values, and so its weights, must be an unbroken run's).
            computed = compute([i])
            if isinstance(computed, dict):
                self.store[keys[i]] = {name: value[0].detach() for name, value in computed.items()}
            else:
                self.store[keys[i]] = computed[0].detach()
        self.hits += len(keys) - len(unique)
        self.misses += len(unique)
        for k in keys:
            self.store.move_to_end(k)
        while len(self.store) > self.max_items:
            self.store.popitem(last=False)
        values = [self.store[k] for k in keys]
        if isinstance(values[0], dict):
            return {name: torch.stack([v[name] for v in values]) for name in values[0]}
        return torch.stack(values)
