"""ONNX export: onnxruntime gives the same detections as detkit's predict on real BCCD val images, the file passes
onnx.checker, and a file that is not a detkit detector is refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install 'detkit[export]'")
ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'detkit[export]'")
pytest.importorskip("onnxscript", reason="the export extra is not installed: pip install 'detkit[export]'")

from detkit.data.coco import read_rgb  # noqa: E402
from detkit.data.transforms import LetterboxImage  # noqa: E402
from tests.conftest import BCCD  # noqa: E402
from tests.test_cli import FAST, FAST_DATA, run  # noqa: E402
from tests.test_recipes import compose_train, fit_steps  # noqa: E402

SIZE = 160


def bccd_val_batch(n: int) -> torch.Tensor:
    val = json.loads((BCCD / "annotations" / "val.json").read_text())
    letterbox = LetterboxImage(SIZE)
    boxed = [letterbox(read_rgb(BCCD / "images" / im["file_name"]))[0] for im in val["images"][:n]]
    return torch.stack([torch.from_numpy(b.transpose(2, 0, 1).copy()) for b in boxed])  # uint8 [n, 3, S, S]


def assert_same_detections(ours, theirs) -> int:
    """Same detections per image (boxes within 1e-2 px, scores within 1e-4, same labels), whatever their order
    among equal scores."""
    boxes, scores, labels, valid = (t.numpy() for t in ours)
    o_boxes, o_scores, o_labels, o_count = theirs
    for i in range(len(boxes)):
        n = int(valid[i].sum())
        assert int(o_count[i]) == n, (i, n, int(o_count[i]))
        ob, os_, ol = o_boxes[i, :n], o_scores[i, :n], o_labels[i, :n]
        for b, s, c in zip(boxes[i, :n], scores[i, :n], labels[i, :n]):
            close = (np.abs(ob - b).max(1) < 1e-2) & (np.abs(os_ - s) < 1e-4) & (ol == c)
            assert close.any(), f"image {i}: detection {b} {s} {c} missing from onnxruntime's output"
    return int(valid.sum())


@pytest.mark.slow  # about 50 s each: a short training, an export in a subprocess and two comparisons
@pytest.mark.parametrize("model", ["faster_rcnn", "yolo"])
def test_onnxruntime_matches_predict_on_real_images(synthetic, tmp_path, model):
    cfg = compose_train(synthetic, f"model={model}", f"data.image_size={SIZE}",
                        *([] if model == "faster_rcnn" else ["model.ema_decay=null", "model.optimizer.lr=0.002"]),
                        fast=FAST if model == "faster_rcnn" else FAST_DATA)
    module, trainer = fit_steps(cfg, steps=4)  # a few steps: scores spread out from their initial values
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "export"
    r = run(["detkit-export", f"checkpoint={ckpt}", f"hydra.run.dir={out}"])
    assert r.returncode == 0, r.stdout + r.stderr
    onnx.checker.check_model(str(out / "model.onnx"))
    meta = json.loads((out / "model.json").read_text())
    assert meta["image_size"] == SIZE and [c["id"] for c in meta["categories"]] == [0, 1, 2]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    module.eval()
    for n in (1, 4):
        images = bccd_val_batch(n)
        with torch.no_grad():
            ours = module.inference_model.predict(images)
        assert assert_same_detections(ours, session.run(None, {"images": images.numpy()})) > 0


def test_a_file_that_is_not_a_detector_checkpoint_is_refused(tmp_path):
    bogus = tmp_path / "encoder.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, bogus)
    r = run(["detkit-export", f"checkpoint={bogus}", f"hydra.run.dir={tmp_path / 'x'}"])
    text = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in text, text
    assert "is not a detkit detector checkpoint" in text
