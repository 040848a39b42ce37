"""COCO evaluation: the official printout exactly, faster-coco-eval equal to pycocotools, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detkit.cli.evaluate import main as eval_main  # noqa: F401  (import check of the entry point)
from detkit.eval.coco_eval import STAT_KEYS, PredictionError, evaluate_coco
from tests.helpers import SHARED, needs_shared

OFFICIAL = SHARED / "cocoapi_val2014_100"


def _random_case(seed: int, n_images: int = 30, n_cats: int = 4) -> tuple[dict, list]:
    rng = np.random.default_rng(seed)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(n_images)]
    cats = [{"id": c * 3, "name": f"c{c}"} for c in range(n_cats)]
    anns, results = [], []
    for im in images:
        for _ in range(rng.integers(0, 6)):
            w, h = rng.uniform(5, 300, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            c = int(rng.integers(n_cats)) * 3
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.05)})
            if rng.random() < 0.8:
                jitter = rng.normal(0, 0.1 * min(w, h), 4)
                results.append({"image_id": im["id"], "category_id": c, "score": float(rng.random()),
                                "bbox": [x + jitter[0], y + jitter[1], max(1, w + jitter[2]), max(1, h + jitter[3])]})
        for _ in range(rng.integers(0, 4)):  # false positives
            results.append({"image_id": im["id"], "category_id": int(rng.integers(n_cats)) * 3,
                            "score": float(rng.random()), "bbox": [*rng.uniform(0, 300, 2), *rng.uniform(5, 200, 2)]})
    return {"images": images, "annotations": anns, "categories": cats}, results


@needs_shared
def test_official_cocoapi_printout_is_reproduced_exactly():
    gt = json.loads((OFFICIAL / "instances_val2014_100.json").read_text())
    res = json.loads((OFFICIAL / "instances_val2014_fakebbox100_results.json").read_text())
    text = (OFFICIAL / "val2014_fake_eval_res.txt").read_text()
    official = text[text.index("type=bbox"):].split("\n")
    official = [ln for ln in official if ln.startswith(" Average")][:12]
    for backend in ("pycocotools", "faster_coco_eval"):
        assert evaluate_coco(gt, res, backend=backend).summary().splitlines() == official


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_backend_equals_pycocotools_on_random_inputs(seed):
    gt, res = _random_case(seed)
    ref = evaluate_coco(gt, res, backend="pycocotools")
    fast = evaluate_coco(gt, res, backend="faster_coco_eval")
    for k in STAT_KEYS:
        assert fast.stats[k] == pytest.approx(ref.stats[k], abs=1e-12), k
    for a, b in zip(ref.per_class, fast.per_class):
        assert a["id"] == b["id"] and a["AP"] == pytest.approx(b["AP"], abs=1e-12)


def test_undefined_stats_are_minus_one_and_no_predictions_is_zero():
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20]}],  # small only
          "categories": [{"id": 5, "name": "x"}]}
    r = evaluate_coco(gt, [], backend="faster_coco_eval")
    assert r.stats["AP"] == 0.0 and r.stats["APm"] == -1.0 and r.stats["APl"] == -1.0
    r = evaluate_coco(gt, [{"image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20], "score": 0.9}])
    assert r.stats["AP"] == pytest.approx(1.0) and r.per_class[0]["AP50"] == pytest.approx(1.0)


def test_unknown_image_or_category_ids_are_a_clear_error():
    gt, res = _random_case(0, n_images=3)
    with pytest.raises(PredictionError, match=r"image ids not in the ground truth, e\.g\. #0: image_id 99"):
        evaluate_coco(gt, [{**res[0], "image_id": 99}, *res[1:]])
    with pytest.raises(PredictionError, match=r"category ids not in the ground truth .* #0: category_id 1\b"):
        evaluate_coco(gt, [{**res[0], "category_id": 1}, *res[1:]])


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_ground_truth_annotation_id_zero_is_not_lost(backend):
    """COCOeval tests a detection's matched ground-truth *id* for truth: an annotation with id 0 would count as
    unmatched (AP 0.5 here). detkit renumbers annotation ids before evaluating."""
    gt = {"images": [{"id": 0, "file_name": "a.jpg", "width": 200, "height": 200}],
          "annotations": [{"id": 0, "image_id": 0, "category_id": 0, "bbox": [10, 10, 50, 50]},
                          {"id": 1, "image_id": 0, "category_id": 0, "bbox": [100, 100, 50, 50]}],
          "categories": [{"id": 0, "name": "x"}]}
    res = [{"image_id": 0, "category_id": 0, "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    assert evaluate_coco(gt, res, backend=backend).stats["AP"] == pytest.approx(1.0)
