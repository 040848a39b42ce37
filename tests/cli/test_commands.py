"""Each console script once as a user runs it: a process of its own, started from the installed script (the other
CLI tests call the entry points in-process, tests/helpers.cli). A module fixture starts them two at a time (one per
core of the 2-core machines the suite is sized for; one at a time in a pytest-xdist worker, beside the other worker)
and each test waits for its own, so their start-up (importing torch and Lightning again) overlaps without crowding
the cores."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers import BIN, ROOT, dump, env_with_path, load

COMMANDS = ["detkit-train", "detkit-pretrain", "detkit-eval", "detkit-predict", "detkit-export", "detkit-report",
            "detkit-probe", "detkit-data-check", "detkit-convert", "detkit-study"]


def _inputs(tmp: Path, trained_run: Path, ann: Path, root: Path) -> dict[str, list[str]]:
    """Each command's arguments: the cheapest call that still shows it works end to end (a real output, or the
    one-line error of a user mistake, exit status 1)."""
    gt = load(ann)
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in gt["annotations"]]
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not an image")
    report_run = tmp / "report_run"
    shutil.copytree(trained_run, report_run, ignore=shutil.ignore_patterns("checkpoints", "report*"))
    (tmp / "yolo" / "images").mkdir(parents=True)
    (tmp / "yolo" / "labels").mkdir()
    cv2.imwrite(str(tmp / "yolo" / "images" / "a.png"), np.zeros((40, 60, 3), np.uint8))
    (tmp / "yolo" / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    (tmp / "classes.txt").write_text("cell\n")
    from tests.cli.test_study import _fake_sweep
    study = _fake_sweep(tmp, {("yolo", "scratch", "1.0", 0): 0.5, ("yolo", "simclr", "1.0", 0): 0.6})
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    return {
        "detkit-train": [f"hydra.run.dir={tmp / 'train'}"],  # no data given: the settings to type, exit 1
        "detkit-pretrain": [f"data.images={broken}", f"hydra.run.dir={tmp / 'pretrain'}"],  # nothing decodes: exit 1
        "detkit-eval": [f"ground_truth={ann}", f"predictions={dump(preds, tmp / 'preds.json')}",
                        f"hydra.run.dir={tmp / 'eval'}"],
        "detkit-predict": [f"checkpoint={ckpt}", f"input={root}", "device=cpu", "num_workers=0",
                           f"hydra.run.dir={tmp / 'predict'}"],
        "detkit-export": [f"checkpoint={ann}", f"hydra.run.dir={tmp / 'export'}"],  # not a checkpoint: exit 1
        "detkit-report": [str(report_run)],
        "detkit-probe": [str(tmp / "missing.pt"), str(tmp), str(tmp)],  # no encoder file: exit 1
        "detkit-data-check": [str(ann), str(root)],
        "detkit-convert": ["yolo", str(tmp / "yolo" / "labels"), str(tmp / "yolo" / "images"),
                           str(tmp / "yolo.json"), "--classes", str(tmp / "classes.txt")],
        "detkit-study": ["--out", str(study), "--report-only"],
    }


@pytest.fixture(scope="module")
def launched(tmp_path_factory, trained_run, synthetic_set) -> tuple[dict[str, Future], Path]:
    tmp = tmp_path_factory.mktemp("commands")
    args = _inputs(tmp, trained_run, *synthetic_set)
    env = env_with_path(ROOT)

    def run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / name), *args[name]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, timeout=600)

    # two at a time; one under pytest-xdist, where the other core runs the other worker's tests
    with ThreadPoolExecutor(max_workers=1 if os.environ.get("PYTEST_XDIST_WORKER") else 2) as pool:
        yield {name: pool.submit(run, name) for name in COMMANDS}, tmp


def finished(launched, name: str) -> tuple[int, str, Path]:
    futures, tmp = launched
    r = futures[name].result()
    return r.returncode, r.stdout, tmp


def test_every_console_script_is_smoke_tested():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == sorted(COMMANDS)


def test_detkit_train(launched):
    code, out, tmp = finished(launched, "detkit-train")
    assert code == 1 and "Traceback" not in out and "required settings not given" in out, out[-3000:]


def test_detkit_pretrain(launched):
    code, out, tmp = finished(launched, "detkit-pretrain")
    assert code == 1 and "Traceback" not in out and "none of the 1 image files" in out, out[-3000:]


def test_detkit_eval(launched):
    code, out, tmp = finished(launched, "detkit-eval")
    assert code == 0, out[-3000:]
    assert load(tmp / "eval" / "metrics.json")["AP"] == pytest.approx(1.0)


def test_detkit_predict(launched):
    code, out, tmp = finished(launched, "detkit-predict")
    assert code == 0, out[-3000:]
    assert len(load(tmp / "predict" / "predictions.json")["images"]) == 8


def test_detkit_export(launched):
    code, out, tmp = finished(launched, "detkit-export")
    assert code == 1 and "Traceback" not in out and "not a detkit detector checkpoint" in out, out[-3000:]


def test_detkit_report(launched):
    code, out, tmp = finished(launched, "detkit-report")
    assert code == 0, out[-3000:]
    assert (tmp / "report_run" / "report.html").is_file()


def test_detkit_probe(launched):
    code, out, tmp = finished(launched, "detkit-probe")
    assert code == 1 and "detkit-probe: error:" in out and "Traceback" not in out, out[-3000:]


def test_detkit_data_check(launched):
    code, out, tmp = finished(launched, "detkit-data-check")
    assert code == 0, out[-3000:]


def test_detkit_convert(launched):
    code, out, tmp = finished(launched, "detkit-convert")
    assert code == 0, out[-3000:]
    assert len(load(tmp / "yolo.json")["annotations"]) == 1


def test_detkit_study(launched):
    code, out, tmp = finished(launched, "detkit-study")
    assert code == 0, out[-3000:]
    assert (tmp / "study" / "study.md").is_file()
