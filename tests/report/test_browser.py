"""The report in a real browser: headless Chromium loads the page, every image decodes, none is missing.

Skipped where Chromium is not installed, unless LFT_REQUIRE_BROWSER=1 (CI sets it, and installs Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from report_fixtures import make_run

from lightning_ft.report.compare import write_comparison
from lightning_ft.report.run_report import write_run_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("LFT_REQUIRE_BROWSER") == "1":
            pytest.fail("LFT_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH")
    return CHROMIUM


def rendered_dom(browser: str, page, tmp_path) -> str:
    """The page's DOM after load, as Chromium ran it (its inline script included)."""
    result = subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
         "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def loaded(dom: str) -> tuple[int, int, str]:
    match = re.search(r'<body[^>]*data-images-loaded="(\d+)/(\d+)"', dom)
    assert match, "the page's load script did not run"
    broken = re.search(r'data-images-broken="([^"]*)"', dom)
    return int(match.group(1)), int(match.group(2)), broken.group(1) if broken else ""


def test_run_report_loads_with_every_figure(chromium, tmp_path):
    folder = make_run(tmp_path, fid=[60.0, 50.0])
    ok, total, broken = loaded(rendered_dom(chromium, write_run_report(folder), tmp_path))
    assert total == len(list((folder / "report").glob("*.png"))) == 4
    assert ok == total and broken == ""


def test_a_broken_image_is_caught(chromium, tmp_path):
    """The check itself: an image that does not decode is counted and named."""
    page = write_run_report(make_run(tmp_path))
    html = page.read_text()
    page.write_text(html.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))  # the first image
    ok, total, broken = loaded(rendered_dom(chromium, page, tmp_path))
    assert ok == total - 1 and broken != ""


def test_comparison_loads_with_every_figure(chromium, tmp_path):
    runs = [make_run(tmp_path, name) for name in ("a", "b")]
    ok, total, broken = loaded(rendered_dom(chromium, write_comparison(runs, tmp_path / "cmp"), tmp_path))
    assert ok == total == 2 and broken == ""
