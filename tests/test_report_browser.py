"""report.html opened from disk in headless Chromium: the table and every picture load."""

import re
import shutil
import subprocess

import pytest

from padim.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_renders_with_table_and_all_images(synthetic_root, tmp_path):
    out = tmp_path / "bench"
    assert main(["benchmark", "--data-root", str(synthetic_root), "--categories", "fabric", "--output", str(out),
                 "--backbone", "resnet18", "--weights", "random", "--image-size", "64", "--device", "cpu"]) == 0
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
         (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    n_images = int(re.search(r'data-images="(\d+)"', body).group(1))
    assert re.search(r'data-broken-images="(\d+)"', body).group(1) == "0"
    assert n_images == 2 + 6 + 3  # ROC, histogram, 6 defect panels, 3 good panels
    assert '<table id="results">' in dom and "<th>fabric</th>" in dom and "<th>Mean</th>" in dom
