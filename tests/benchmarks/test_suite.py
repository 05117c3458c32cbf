"""The performance suite runs every benchmark with the device and precision it is given and writes one report."""

from __future__ import annotations

import subprocess
import sys
from argparse import Namespace

import pytest

from benchmarks.perf import REPO, device_overrides, trainer_overrides


def test_device_and_precision_become_trainer_arguments():
    assert trainer_overrides(Namespace(device="cuda", precision="bf16-mixed")) == [
        "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed"]  # fmt: skip
    assert trainer_overrides(Namespace(device="cuda:2", precision="16-mixed"))[3] == "[2]"
    assert device_overrides(Namespace(device="cpu", precision="32-true")) == []  # defaults: runs keep their settings
    assert device_overrides(Namespace(device="cpu", precision="bf16-mixed"))[-1] == "bf16-mixed"


@pytest.mark.slow
def test_quick_suite_writes_one_report_with_every_table(tmp_path):
    command = [sys.executable, "-m", "benchmarks.suite", "--quick", "--only", "overhead", "speed_options",
               "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=1200)
    report = (tmp_path / "performance_suite.md").read_text()
    assert "device cpu, precision 32-true" in report and "torch " in report
    assert "## overhead" in report and "## speed_options" in report and "FAILED" not in report
    assert "| same work | cpu | 32-true |" in report and "| defaults | cpu | 32-true |" in report
    assert "| fused AdamW |" in report
