"""The HTML report opens in a real browser with its images: headless Chromium (Debian's package), marked slow."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conceptkit.cli import app

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_report_renders_with_its_images_in_headless_chromium(tmp_path):
    from conceptkit.toy import render, sample_scenes

    for name, seed in (("a", 0), ("b", 1)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(render(sample_scenes(16, seed))):
            Image.fromarray(im).save(tmp_path / name / f"{i:03d}.png")
    r = CliRunner().invoke(app, ["evaluate", "images", str(tmp_path / "a"), str(tmp_path / "b"), "--prompt", "a shape",
                                 "--report", str(tmp_path / "rep"), "--json"])
    assert r.exit_code == 0, r.output
    html = tmp_path / "rep" / "report.html"
    moved = tmp_path / "elsewhere" / "report.html"  # self-contained: it renders on its own, away from its PNGs
    moved.parent.mkdir()
    shutil.copy(html, moved)
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,1400",
                    f"--screenshot={shot}", f"file://{moved}"], check=True, timeout=120, capture_output=True)
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.shape[0] >= 1000 and px.std() > 10  # not blank
    saturated = (px.max(-1) - px.min(-1)) > 100  # text and tables are grey: colour comes only from the embedded images
    assert saturated.sum() > 500, saturated.sum()
    doc = json.loads(r.stdout)
    assert doc["report"]["html"] == str(html)
