"""DDP on CPU through a script in a subprocess: 2 processes reach the weights of 1 process at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_images

SCRIPT = Path(__file__).with_name("ddp_fit.py")


def _fit(devices: int, images: Path, out: Path, class_images: int = 0) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(devices), str(images), str(out), str(class_images)],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one_at_the_same_global_batch(tmp_path):
    images = write_images(tmp_path / "images", 4)
    one = _fit(1, images, tmp_path / "one.pt")
    two = _fit(2, images, tmp_path / "two.pt")
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["steps"] == two["steps"] == 3
    # Tolerance: DDP sums the two halves' fp32 gradients in another order than one process does, and Adam divides
    # each gradient element by its own running scale, so a near-zero element's rounding difference can move its
    # weight by a visible fraction of one step. Bound: 0.1 x lr (1e-4) per weight; and 99.5% of all weights
    # within 1e-6.
    close, total = 0, 0
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, rtol=0, atol=1e-4)
        close += int(((two["state"][key] - value).abs() <= 1e-6).sum())
        total += value.numel()
    assert close / total > 0.995
    moved = [k for k, v in one["state"].items() if not torch.equal(v, one["initial"][k])]
    assert len(moved) > len(one["state"]) // 2  # the runs trained: the agreement is not that of untouched weights


@pytest.mark.slow
def test_class_images_are_sampled_once_split_across_ranks_and_equal_to_one_process(tmp_path):
    images = write_images(tmp_path / "images", 4)
    _fit(1, images, tmp_path / "one.pt", class_images=6)
    _fit(2, images, tmp_path / "two.pt", class_images=6)
    # Each of the 2 ranks sampled half of the 6 images (one process sampled all 6) ...
    assert (tmp_path / "one.pt.rank0").read_text() == "6"
    assert [(tmp_path / f"two.pt.rank{r}").read_text() for r in (0, 1)] == ["3", "3"]
    # ... into one complete folder, image for image the same as the single process's (one seed per image).
    (one,) = [p for p in (tmp_path / "class_cache_1").iterdir() if ".partial" not in p.name]
    (two,) = [p for p in (tmp_path / "class_cache_2").iterdir() if ".partial" not in p.name]
    names = sorted(p.name for p in one.glob("*.png"))
    assert len(names) == 6 and names == sorted(p.name for p in two.glob("*.png"))
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.slow
def test_two_processes_share_each_epochs_bucket_batches_without_overlap(tmp_path):
    """Aspect buckets under real DDP: Lightning re-creates the bucket sampler with its DistributedSampler, and the two
    ranks take disjoint halves of the same epoch's batches (each batch one bucket), a new draw each epoch."""
    import json

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(128, 64), (96, 96), (64, 128), (120, 60)]):
        Image.new("RGB", size, (40 * i, 90, 160)).save(images / f"img_{i}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    script = Path(__file__).with_name("bucket_fit.py")
    result = subprocess.run([sys.executable, str(script), "2", str(images), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    for epoch in ("epoch0", "epoch1"):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert len(a) == len(b) > 0
        # 16 items in 8 batches of one bucket each: no padding, so the shares are disjoint
        assert not {i for batch in a for i in batch} & {i for batch in b for i in batch}
    assert ranks[0]["epoch0"] != ranks[0]["epoch1"]
    for record in ranks:
        assert len(record["steps"]) == len(record["epoch0"]) + len(record["epoch1"])  # both epochs, every batch
        for step in record["steps"]:
            assert step["shape"][-2:] in ([48, 80], [64, 64], [80, 48])
