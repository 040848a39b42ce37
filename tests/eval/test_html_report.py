"""The results browser: a static page that opens from disk. Headless Chromium (Debian's ``chromium``) loads the
report of a short real run, the gallery shows every evaluated image, the class filter (driven by the URL hash, as
the page's controls set it) narrows it, and a screenshot is kept as a test artifact."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, cli, load

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
ARTIFACTS = ROOT / "runs" / "test-artifacts"


def headless(url: str, *flags: str) -> str:
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                        "--virtual-time-budget=3000", *flags, url], capture_output=True, text=True, timeout=120)
    return r.stdout


@pytest.fixture
def evaluated_run(trained_run, tmp_path) -> Path:
    """The session's short real run (conftest.trained_run: 2 epochs on the synthetic set, evaluated, report.html
    written by detkit-train), copied without its checkpoints so a test may change it."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


def test_train_writes_a_report_that_embeds_every_image(trained_run):
    page = (trained_run / "report.html").read_text()
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert len(data["images"]) == 8 and all((trained_run / im["thumb"]).is_file() for im in data["images"])
    assert all((trained_run / im["full"]).resolve().is_file() for im in data["images"])  # referenced, not copied
    assert "http://" not in page and "https://" not in page  # nothing from the network
    assert len(load(trained_run / "predictions.json")) >= sum(len(im["dt"]) for im in data["images"])


def test_detkit_report_rewrites_it_from_the_run(evaluated_run):
    (evaluated_run / "report.html").unlink()
    r = cli("detkit-report", str(evaluated_run))
    assert r.returncode == 0, r.output
    assert (evaluated_run / "report.html").is_file()
    r = cli("detkit-report", str(evaluated_run / "nope"))
    assert r.returncode == 1 and "is an evaluated detkit run" not in r.output and "does not exist" in r.output


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; "
                                             "`make browser` does it)")
def test_the_gallery_renders_and_the_class_filter_narrows_it(trained_run):
    url = (trained_run / "report.html").resolve().as_uri()
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


# Each payload marks <body> with its own attribute if it ever runs (no "/" in the ones that are also file names).
XSS = [
    "</script><script>document.body.setAttribute('data-xss-script','ran')</script>",
    "<img src=x onerror=\"document.body.setAttribute('data-xss-img','ran')\">",
    "<svg onload=\"document.body.setAttribute('data-xss-svg','ran')\">",
    "R&D <b>bold",
]
COLOR_BGR = (0, 200, 200)  # the images' fill: olive (RGB 200, 200, 0), unlike any box colour of the page


def hand_built_report(tmp_path: Path, categories: list[str], files: list[str], annotations: list[dict],
                      results: list[dict], best_confidence: float = 0.3) -> Path:
    """A report of hand-built ground truth and detections on solid-colour 200x150 images named ``files``."""
    import cv2
    import numpy as np

    from detkit.eval.html_report import build_report

    root = tmp_path / "images"
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        ok, buf = cv2.imencode(".jpg", np.full((150, 200, 3), COLOR_BGR, np.uint8))
        (root / name).write_bytes(buf.tobytes())  # cv2.imwrite cannot write some of these names
    gt = {"images": [{"id": i + 1, "file_name": f, "width": 200, "height": 150} for i, f in enumerate(files)],
          "categories": [{"id": k + 1, "name": n} for k, n in enumerate(categories)], "annotations": annotations}
    out = tmp_path / "run"
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"AP": 0.5, "per_class": [{"id": k + 1, "name": n, "AP": 0.5} for k, n in enumerate(categories)],
               "report": {"best_f1_confidence": best_confidence}}
    return build_report(out, gt, results, root, metrics, title="hostile " + categories[0])


def hostile_report(tmp_path: Path) -> Path:
    """Every hostile string as a category name, and as a file name where a file name can hold it (no "/")."""
    files = [f"{s}.jpg" for s in XSS if "/" not in s]
    annotations = [{"id": i, "image_id": i + 1, "category_id": i % len(XSS) + 1, "bbox": [10, 10, 50, 40],
                    "area": 2000, "iscrowd": 0} for i in range(len(files))]
    results = [{"image_id": i + 1, "category_id": k + 1, "bbox": [20 + 10 * k, 20, 50, 40], "score": 0.9}
               for i in range(len(files)) for k in range(len(XSS))]
    return hand_built_report(tmp_path, XSS, files, annotations, results)


def tiles(dom: str) -> list[str]:
    return re.findall(r'class="tile" data-image-id="(\d+)"', dom)


def test_embedded_json_cannot_close_its_script_and_a_csp_allows_only_the_page_script(tmp_path):
    page = hostile_report(tmp_path).read_text()
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", page, re.S)
    assert len(scripts) == 2  # the data block and the page's own script: no name closed the data block
    data_block = scripts[0]
    assert "<" not in data_block and ">" not in data_block and "&" not in data_block
    assert [c["name"] for c in json.loads(data_block)["categories"]] == XSS
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    import base64
    import hashlib
    digest = base64.b64encode(hashlib.sha256(scripts[1].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_hostile_names_run_no_script_and_show_as_text(tmp_path):
    import html as html_lib
    url = hostile_report(tmp_path).resolve().as_uri()
    dom = headless(url, "--dump-dom")
    body = dom[dom.index("<body"):]
    assert "data-xss" not in re.search(r"<body[^>]*>", body).group(0), body[:200]  # no payload ran
    assert "<script>document" not in body and '<img src="x"' not in body and "<svg onload" not in body
    assert "<b>" not in body  # no name became markup
    assert len(tiles(dom)) == 3, dom[-3000:]  # the gallery rendered under the CSP
    for s in XSS:  # every name is there as text: the class menu, the per-class table, the box labels
        assert dom.count(html_lib.escape(s, quote=False)) >= 3, s
    for s in XSS[1:]:  # and every file name under its tile
        assert f"{html_lib.escape(s, quote=False)}.jpg" in dom
    assert len(re.findall(r"<text\b", dom)) == 3 * len(XSS)  # every box label, in the SVG, as text


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_the_csp_blocks_any_other_script_and_lets_the_thumbnails_load(tmp_path):
    import cv2
    import numpy as np
    report = hostile_report(tmp_path)
    extra = "<script>document.body.setAttribute('data-extra','ran')</script>"  # an inline script the CSP does not list
    report.write_text(report.read_text().replace("</body>", extra + "</body>"))
    dom = headless(report.resolve().as_uri(), "--dump-dom")
    assert len(tiles(dom)) == 3 and "data-extra" not in re.search(r"<body[^>]*>", dom).group(0)
    shot = tmp_path / "shot.png"
    headless(report.resolve().as_uri(), f"--screenshot={shot}", "--window-size=1000,2400")
    image = cv2.imread(str(shot)).astype(int)
    olive = (np.abs(image - np.asarray(COLOR_BGR)).max(-1) < 30).sum()
    assert olive > 3 * 256 * 192 * 0.8  # the three thumbnails (256x192), drawn from report/thumbs by relative path


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_the_page_ignores_a_detection_inside_a_crowd_region_as_cocoeval_does(tmp_path):
    """A dog crowd region [0,0,120,100]: a small dog inside it is ignored (intersection over the detection's area),
    a cat inside it is a false detection (COCOeval matches within a class), as the confusion matrix counts them."""
    crowd = {"id": 0, "image_id": 1, "category_id": 2, "bbox": [0, 0, 120, 100], "area": 12000, "iscrowd": 1}
    dog_inside = {"image_id": 1, "category_id": 2, "bbox": [20, 20, 20, 20], "score": 0.9}
    cat_inside = {"image_id": 2, "category_id": 1, "bbox": [20, 20, 20, 20], "score": 0.9}
    report = hand_built_report(tmp_path, ["cat", "dog"], ["a.jpg", "b.jpg"],
                               [crowd, {**crowd, "id": 1, "image_id": 2}], [dog_inside, cat_inside])
    dom = headless(report.resolve().as_uri() + "#sort=id", "--dump-dom")
    counts = re.findall(r"missed (\d+) · false (\d+) · low IoU (\d+)", dom)
    assert counts == [("0", "0", "0"), ("0", "1", "0")], counts
    from detkit.eval.report import confusion_matrix
    gt = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
          "annotations": [crowd, {**crowd, "id": 1, "image_id": 2}]}
    assert confusion_matrix(gt, [dog_inside, cat_inside], confidence=0.3)[2].tolist() == [1, 0, 0]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """``detkit-train data=bccd`` with the defaults otherwise (the embedded BCCD data, whose paths the saved config
    holds as ``${detkit_data:}``), cut to a few batches."""
    out = tmp_path_factory.mktemp("default")
    r = cli("detkit-train", "data=bccd", *TINY, "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
            f"hydra.run.dir={out}")
    assert r.returncode == 0, r.output[-3000:]
    assert "${detkit_data:}" in (out / ".hydra" / "config.yaml").read_text()
    return out


def test_detkit_report_works_on_a_run_trained_with_the_defaults(default_run):
    (default_run / "report.html").unlink()
    r = cli("detkit-report", str(default_run))
    assert r.returncode == 0, r.output
    page = (default_run / "report.html").read_text()
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert len(data["images"]) == len(load(ROOT / "data" / "bccd" / "annotations" / "val.json")["images"])


def test_a_saved_run_config_loads_in_a_fresh_process_that_imported_no_command(default_run):
    """The loader registers detkit's resolvers itself: a fresh process that imported no command module (nothing
    that could register them as a side effect) resolves the whole saved config (``${detkit_data:}``, and
    ``${hydra:runtime.output_dir}`` as the run directory)."""
    code = ("import sys; from omegaconf import OmegaConf; "
            "from detkit.run_config import load_run_config; cfg = load_run_config(sys.argv[1]); "
            "plain = OmegaConf.to_container(cfg, resolve=True); "
            "assert not [m for m in sys.modules if m.startswith('detkit.cli')], sorted(sys.modules); "
            "print(plain['data']['val_images']); print(plain['paths']['output_dir'])")
    r = subprocess.run([sys.executable, "-c", code, str(default_run)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    images, output_dir = r.stdout.split()[-2:]
    assert Path(images).resolve() == (ROOT / "data" / "bccd" / "images").resolve()
    assert Path(output_dir).resolve() == default_run.resolve()


def test_the_self_training_table_shows_hostile_class_names_as_text():
    import html as html_lib

    from detkit.eval.html_report import _self_training_table
    rows = [{"name": s, "pseudo_labels": 3, "precision": 0.5, "recall": 0.1, "other_class": 0.0,
             "last_threshold": 0.35} for s in XSS]
    info = {"burn_in_steps": 2, "score_threshold": 0.7, "adaptive_threshold": True, "precision_iou": 0.5,
            "per_class": rows, "epochs": [{"epoch": 0, "unlabeled_images": 4, "pseudo_labels": 3}]}
    table = _self_training_table(info)
    for s in XSS:
        assert table.count(f"<td>{html_lib.escape(s)}</td>") == 1  # each name once, escaped
    assert not any(s in table for s in XSS if "<" in s)  # never as markup
    assert "<th>last threshold</th>" in table and "class-wise thresholds adapted" in table
    assert "background RoIs weighted" not in table
    assert "background RoIs weighted by the teacher" in _self_training_table({**info, "soft_background": True})
