"""The results browser: a static page that opens from disk. Headless Chromium (Debian's ``chromium``) loads the
report of a short real run, the gallery shows every evaluated image, the class filter (driven by the URL hash, as
the page's controls set it) narrows it, and a screenshot is kept as a test artifact."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, load
from tests.test_cli import FAST, data_args, run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
ARTIFACTS = ROOT / "runs" / "test-artifacts"


def headless(url: str, *flags: str) -> str:
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                        "--virtual-time-budget=3000", *flags, url], capture_output=True, text=True, timeout=120)
    return r.stdout


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    """A short real run on the synthetic set, evaluated, with report.html written by detkit-train."""
    from detkit.data.synthetic import make_synthetic_coco
    ann, root = make_synthetic_coco(tmp_path_factory.mktemp("syn"), num_images=8, first_id=0, empty_every=4)
    out = tmp_path_factory.mktemp("run")
    r = run(["detkit-train", *data_args(ann, root), *FAST, "trainer.max_epochs=2", f"hydra.run.dir={out}"])
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_train_writes_a_report_that_embeds_every_image(evaluated_run):
    page = (evaluated_run / "report.html").read_text()
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert len(data["images"]) == 8 and all((evaluated_run / im["thumb"]).is_file() for im in data["images"])
    assert all((evaluated_run / im["full"]).resolve().is_file() for im in data["images"])  # referenced, not copied
    assert "http://" not in page and "https://" not in page  # nothing from the network
    assert len(load(evaluated_run / "predictions.json")) >= sum(len(im["dt"]) for im in data["images"])


def test_detkit_report_rewrites_it_from_the_run(evaluated_run):
    (evaluated_run / "report.html").unlink()
    r = run(["detkit-report", str(evaluated_run)])
    assert r.returncode == 0, r.stderr
    assert (evaluated_run / "report.html").is_file()
    r = run(["detkit-report", str(evaluated_run / "nope")])
    assert r.returncode == 1 and "is an evaluated detkit run" not in r.stdout and "does not exist" in r.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; "
                                             "`make browser` does it)")
def test_the_gallery_renders_and_the_class_filter_narrows_it(evaluated_run):
    url = (evaluated_run / "report.html").resolve().as_uri()
    dom = headless(url, "--dump-dom")
    tiles = re.findall(r'class="tile" data-image-id="(\d+)"', dom)
    assert len(tiles) == 8, dom[-2000:]
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', dom, re.S).group(1))
    cat = data["categories"][0]
    with_class = [im["id"] for im in data["images"]
                  if any(g[4] == cat["id"] for g in im["gt"])
                  or any(d[4] == cat["id"] and d[5] >= 0.5 for d in im["dt"])]
    dom = headless(f"{url}#class={cat['name']}&score=0.5", "--dump-dom")
    shown = re.findall(r'class="tile" data-image-id="(\d+)"', dom)
    assert sorted(map(int, shown)) == sorted(with_class) and len(shown) < 8
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    headless(url, f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.is_file() and shot.stat().st_size > 10_000
