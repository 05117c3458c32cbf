"""A run killed with SIGKILL mid-training and resumed from its last checkpoint ends with an unbroken run's weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_images

SCRIPT = Path(__file__).with_name("resume_fit.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def _run(root: Path, images: Path, resume: bool = False) -> None:
    args = [sys.executable, str(SCRIPT), str(root), str(images)] + (["--resume"] if resume else [])
    result = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_sigkill_then_resume_ends_bitwise_equal_to_an_unbroken_run(tmp_path):
    images = write_images(tmp_path / "images", 3)
    _run(tmp_path / "unbroken", images)

    broken = tmp_path / "broken"
    process = subprocess.Popen([sys.executable, str(SCRIPT), str(broken), str(images)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not list((broken / "ckpt").glob("*step=4*.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-training, possibly mid-save: no cleanup of any kind
    process.wait()
    assert not (broken / "final.pt").exists(), "the run finished before it was killed"
    last = torch.load(broken / "ckpt" / "last.ckpt", weights_only=False)  # loads: writes are atomic
    assert 3 <= last["global_step"] < 8, last["global_step"]  # step 4 appeared; last.ckpt follows it
    _run(broken, images, resume=True)

    a = torch.load(tmp_path / "unbroken" / "final.pt", weights_only=False)
    b = torch.load(broken / "final.pt", weights_only=False)
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key  # bitwise, on CPU with deterministic settings
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y)
