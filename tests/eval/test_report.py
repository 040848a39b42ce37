"""Detection reports on a hand-built case whose precision, recall, F1 and confusion counts are known."""

from __future__ import annotations

import numpy as np
import pytest

from detkit.eval.coco_eval import evaluate_coco
from detkit.eval.outputs import write_evaluation
from detkit.eval.report import confusion_matrix, detection_report

# Two images, classes cat (1) and dog (2). Image 1: a cat at [0,0,10,10], a dog at [20,20,10,10]. Image 2: a cat at
# [0,0,20,20] and a crowd region of dogs at [50,50,30,30].
GT = {
    "images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.jpg"},
               {"id": 2, "width": 100, "height": 100, "file_name": "2.jpg"}],
    "categories": [{"id": 2, "name": "dog"}, {"id": 1, "name": "cat"}],  # listed out of order on purpose
    "annotations": [
        {"id": 0, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 1},
    ],
}
RESULTS = [
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},     # cat TP
    {"image_id": 1, "category_id": 1, "bbox": [60, 60, 10, 10], "score": 0.8},   # cat FP (nothing there)
    {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "score": 0.3},   # cat FP: it is the dog
    {"image_id": 2, "category_id": 1, "bbox": [0, 0, 20, 19], "score": 0.6},     # cat TP (IoU 0.95)
    {"image_id": 2, "category_id": 2, "bbox": [50, 50, 30, 30], "score": 0.7},   # dog on the crowd: ignored
]


def test_precision_recall_f1_against_confidence_follow_coco_matching():
    r = detection_report(GT, RESULTS)
    assert r.names == ["cat", "dog"] and r.cat_ids == [1, 2] and r.num_gt.tolist() == [2, 1]
    cat, dog = 0, 1
    # cat at confidence 0.5: detections 0.9 (TP), 0.8 (FP), 0.6 (TP) -> P 2/3, R 2/2, F1 0.8
    p, rec, f1 = r.at(0.5)
    assert p[cat] == pytest.approx(2 / 3) and rec[cat] == 1.0 and f1[cat] == pytest.approx(0.8)
    # cat at 0.2 adds the FP at 0.3 -> P 1/2, R 1; at 0.85 only the TP at 0.9 -> P 1, R 1/2
    assert r.at(0.2)[0][cat] == pytest.approx(0.5) and r.at(0.85)[1][cat] == pytest.approx(0.5)
    assert r.at(0.95)[2][cat] == 0.0 and np.isnan(r.at(0.95)[0][cat])  # no detection: P undefined, F1 0
    # the dog is never found (its only detection hits the crowd region, which COCOeval ignores)
    assert r.recall[dog].max() == 0.0 and r.f1[dog].max() == 0.0
    # all classes: mean F1 = (F1_cat + 0) / 2; cat's F1 is highest (0.8) for confidences in (0.3, 0.6]
    assert r.best_confidence == pytest.approx(0.301, abs=1e-9)
    assert r.mean_curves()[2].max() == pytest.approx(0.4)


def test_confusion_matrix_counts_misses_false_detections_and_class_confusions():
    m = confusion_matrix(GT, RESULTS, iou=0.5, confidence=0.25)  # classes in GT["categories"] order: dog, cat
    dog, cat, bg = 0, 1, 2
    expected = np.zeros((3, 3), int)
    expected[cat, cat] = 2   # both cats found
    expected[dog, cat] = 1   # the dog detected as a cat
    expected[bg, cat] = 1    # a cat where there is nothing
    # the dog detection on the crowd region is ignored; no object is missed
    np.testing.assert_array_equal(m, expected)
    m = confusion_matrix(GT, RESULTS, iou=0.5, confidence=0.5)
    expected[dog, cat], expected[dog, bg] = 0, 1  # the 0.3 detection drops out: the dog is now missed
    np.testing.assert_array_equal(m, expected)


def test_reports_are_written_beside_metrics(tmp_path):
    result = evaluate_coco(GT, RESULTS, backend="pycocotools")
    paths = write_evaluation(tmp_path, result, GT, RESULTS, confusion_confidence=0.25)
    import json
    metrics = json.loads(paths["metrics"].read_text())
    assert {p.name for p in tmp_path.iterdir()} == {"metrics.json", "predictions.json", "pr_curves.png", "f1_curves.png",
                                                    "confusion_matrix.png"}
    cat = next(row for row in metrics["per_class"] if row["name"] == "cat")
    assert cat["precision"] == pytest.approx(2 / 3) and cat["recall"] == 1.0 and cat["F1"] == pytest.approx(0.8)
    assert cat["AP50"] > 0.5
    report = metrics["report"]
    assert report["best_f1_confidence"] == pytest.approx(0.301) and report["F1"] == pytest.approx(0.4)
    assert report["confusion_matrix"]["labels"] == ["cat", "dog", "background"]
    assert report["confusion_matrix"]["counts"] == [[2, 0, 0], [1, 0, 0], [1, 0, 0]]


# Image 3: a large crowd region of dogs at [0,0,60,60] and a real cat at [70,70,20,20]. COCOeval measures a
# detection against a crowd region by the intersection over the *detection's* area, within the detection's class.
CROWD_GT = {
    "images": [{"id": 3, "width": 100, "height": 100, "file_name": "3.jpg"}],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    "annotations": [
        {"id": 0, "image_id": 3, "category_id": 2, "bbox": [0, 0, 60, 60], "area": 3600, "iscrowd": 1},
        {"id": 1, "image_id": 3, "category_id": 1, "bbox": [70, 70, 20, 20], "area": 400, "iscrowd": 0},
    ],
}
CROWD_RESULTS = [
    {"image_id": 3, "category_id": 2, "bbox": [10, 10, 10, 10], "score": 0.9},   # dog inside the dog crowd: ignored
    {"image_id": 3, "category_id": 1, "bbox": [30, 30, 10, 10], "score": 0.8},   # cat inside the dog crowd: false
    {"image_id": 3, "category_id": 1, "bbox": [70, 70, 20, 20], "score": 0.7},   # cat TP
    {"image_id": 3, "category_id": 1, "bbox": [0, 0, 60, 60], "score": 0.6},     # cat on the dog crowd: false
]


def test_a_detection_inside_a_crowd_region_is_ignored_as_cocoeval_ignores_it():
    """The dog detection lies inside, not on, the crowd box (IoU 100/3600, intersection over its area 1): COCOeval
    and the curves ignore it, and so must the matrix; a cat inside or on the dog crowd is a false detection for both
    (COCOeval matches within a class)."""
    r = detection_report(CROWD_GT, CROWD_RESULTS)
    cat, dog = 0, 1
    p, rec, _ = r.at(0.5)
    assert np.isnan(p[dog])  # COCOeval ignored the only dog detection: there is none to count
    assert p[cat] == pytest.approx(1 / 3) and rec[cat] == 1.0  # the cats in/on the dog crowd are false positives
    m = confusion_matrix(CROWD_GT, CROWD_RESULTS, iou=0.5, confidence=0.25)
    bg = 2
    expected = np.zeros((3, 3), int)
    expected[cat, cat] = 1   # the real cat found
    expected[bg, cat] = 2    # the cats inside and on the dog crowd: false detections, as COCOeval counts them
    np.testing.assert_array_equal(m, expected)  # the dog inside the crowd: neither found nor false
