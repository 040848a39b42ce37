"""Detection reports beside the COCO statistics: precision, recall and F1 against confidence, and a confusion matrix.

* **P/R/F1 curves** use COCOeval's own matching (pycocotools ``evaluateImg`` at one IoU, all areas, 100 detections
  per image and class): a detection is a true positive when COCOeval matched it to a ground truth, ignored when
  COCOeval ignores it (it matched a crowd region), a false positive otherwise; a class's recall is over its
  non-crowd ground truth. At confidence ``c`` only detections with ``score >= c`` count. Precision is undefined
  (NaN) where a class has no detection at ``c``; F1 is then 0. The all-classes curves are the means over the
  classes that have ground truth (as Ultralytics reports them), and the *best-F1 confidence* is where the
  all-classes F1 is highest.
* **Confusion matrix** ``[K + 1, K + 1]``: rows are the ground-truth class, columns the predicted class, the last
  row and column "background". Per image, detections with ``score >= confidence`` are taken by decreasing score
  and each matches the unmatched ground truth of *any* class with the highest IoU ``>= iou``; a detection that
  matches nothing is a false detection (row background), a ground truth left unmatched is a missed object (column
  background). A detection that matches no ground truth but covers a crowd region *of its own class* by
  ``intersection / detection area >= iou`` is ignored, as COCOeval ignores it (COCOeval's IoU against a crowd
  region divides by the detection's area, so a small detection inside a large crowd box is ignored too; and it
  matches within one class, so a detection on another class's crowd region is a false detection).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from detkit.eval.coco_eval import normalize_ground_truth

#: The confidence grid of the curves.
CONFIDENCES = np.linspace(0.0, 1.0, 1001)


@dataclass
class DetectionReport:
    """Arrays of a report (``K`` classes in ``names`` order, ``C`` points of :data:`CONFIDENCES`).

    Attributes:
        precision, recall, f1: ``[K, C]`` per class against confidence (precision NaN where no detection).
        num_gt: ``[K]`` non-crowd ground-truth boxes per class.
        best_confidence: the confidence of the highest all-classes F1.
        confusion: ``[K + 1, K + 1]`` counts, rows ground truth, columns prediction, last index background.
    """

    names: list[str]
    cat_ids: list[int]
    iou: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    num_gt: np.ndarray
    best_confidence: float
    confusion: np.ndarray
    confusion_iou: float
    confusion_confidence: float

    @property
    def present(self) -> np.ndarray:
        """``[K]`` classes with ground truth (those averaged in the all-classes curves)."""
        return self.num_gt > 0

    def mean_curves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All-classes precision, recall and F1 ``[C]``: means over the classes with ground truth."""
        k = self.present
        if not k.any():
            return (np.full(len(CONFIDENCES), np.nan),) * 2 + (np.zeros(len(CONFIDENCES)),)
        with np.errstate(all="ignore"), _quiet_nan_mean():
            p = np.nanmean(self.precision[k], axis=0)
        return p, self.recall[k].mean(0), self.f1[k].mean(0)

    def at(self, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per class precision, recall, F1 ``[K]`` at the grid point nearest ``confidence``."""
        i = int(np.abs(CONFIDENCES - confidence).argmin())
        return self.precision[:, i], self.recall[:, i], self.f1[:, i]

    def to_json(self) -> dict[str, Any]:
        """The numbers for metrics.json: the all-classes values at the best-F1 confidence and the matrix."""
        p, r, f = self.mean_curves()
        i = int(np.abs(CONFIDENCES - self.best_confidence).argmin())
        return {
            "iou": self.iou, "best_f1_confidence": self.best_confidence,
            "precision": _num(p[i]), "recall": _num(r[i]), "F1": _num(f[i]),
            "confusion_matrix": {"labels": [*self.names, "background"], "rows": "ground truth",
                                 "columns": "prediction", "iou": self.confusion_iou,
                                 "confidence": self.confusion_confidence, "counts": self.confusion.tolist()}}

    def per_class(self) -> list[dict[str, Any]]:
        """Per class ``{"id", "precision", "recall", "F1"}`` at the best-F1 confidence (-1 without ground truth)."""
        p, r, f = self.at(self.best_confidence)
        return [{"id": cid, "precision": _num(p[k]) if self.present[k] else -1.0,
                 "recall": _num(r[k]) if self.present[k] else -1.0, "F1": _num(f[k]) if self.present[k] else -1.0}
                for k, cid in enumerate(self.cat_ids)]


def _num(v: float) -> float:
    """JSON-safe float: NaN (undefined precision) becomes -1, as COCOeval marks undefined values."""
    return -1.0 if not np.isfinite(v) else round(float(v), 6)


@contextlib.contextmanager
def _quiet_nan_mean():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice": all-NaN columns stay NaN
        yield


def _coco_matches(gt: dict, results: Sequence[dict], iou: float) -> list[list[dict]]:
    """COCOeval's per-image evaluation at one IoU, area "all", 100 detections: per category (in ``gt`` order) the
    non-empty ``evaluateImg`` records."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
        coco_dt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.iouThrs = np.array([iou])
        ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [100]
        ev.evaluate()
    n_img = len(ev.params.imgIds)
    return [[e for e in ev.evalImgs[k * n_img:(k + 1) * n_img] if e is not None] for k in range(len(ev.params.catIds))]


def _curves(records: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Precision, recall, F1 ``[C]`` and the ground-truth count of one class from its COCOeval records."""
    num_gt = int(sum((np.asarray(e["gtIgnore"]) == 0).sum() for e in records))
    scores = np.concatenate([np.asarray(e["dtScores"], dtype=float) for e in records] or [np.zeros(0)])
    matched = np.concatenate([np.asarray(e["dtMatches"][0]) > 0 for e in records] or [np.zeros(0, bool)])
    ignored = np.concatenate([np.asarray(e["dtIgnore"][0], dtype=bool) for e in records] or [np.zeros(0, bool)])
    scores, matched = scores[~ignored], matched[~ignored]
    order = np.argsort(scores, kind="mergesort")  # ascending
    scores, matched = scores[order], matched[order]
    # detections with score >= c are the suffix from searchsorted(scores, c, "left")
    start = np.searchsorted(scores, CONFIDENCES, side="left")
    tp_suffix = np.concatenate([np.cumsum(matched[::-1])[::-1], [0]])
    n_det = len(scores) - start
    tp = tp_suffix[start].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_det > 0, tp / np.maximum(n_det, 1), np.nan)
        recall = tp / num_gt if num_gt else np.zeros(len(CONFIDENCES))
        f1 = np.where((n_det > 0) & (precision + recall > 0), 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, np.nan_to_num(f1), num_gt


def _iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[N, M]`` of xywh boxes."""
    ax2, ay2, bx2, by2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return inter / np.maximum(union, 1e-12)


def _crowd_overlap(d: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """COCOeval's IoU of detections ``[N]`` against crowd regions ``[M]`` (xywh): the intersection over the
    detection's area, ``[N, M]``."""
    iw = np.clip(np.minimum(d[:, None, 0] + d[:, None, 2], crowd[None, :, 0] + crowd[None, :, 2])
                 - np.maximum(d[:, None, 0], crowd[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(d[:, None, 1] + d[:, None, 3], crowd[None, :, 1] + crowd[None, :, 3])
                 - np.maximum(d[:, None, 1], crowd[None, :, 1]), 0, None)
    return iw * ih / np.maximum(d[:, 2] * d[:, 3], 1e-12)[:, None]


def confusion_matrix(gt: dict, results: Sequence[dict], iou: float = 0.5, confidence: float = 0.25) -> np.ndarray:
    """``[K + 1, K + 1]`` confusion counts (see the module docstring); classes in ``gt["categories"]`` order."""
    index = {c["id"]: k for k, c in enumerate(gt["categories"])}
    bg = len(index)
    matrix = np.zeros((bg + 1, bg + 1), dtype=np.int64)
    gts: dict = {}
    for a in gt["annotations"]:
        gts.setdefault(a["image_id"], []).append(a)
    dets: dict = {}
    for r in results:
        if r["score"] >= confidence:
            dets.setdefault(r["image_id"], []).append(r)
    for im in gt["images"]:
        anns = gts.get(im["id"], [])
        real = [a for a in anns if not a.get("iscrowd", 0)]
        crowds = [a for a in anns if a.get("iscrowd", 0)]
        crowd = np.asarray([a["bbox"] for a in crowds], dtype=float).reshape(-1, 4)
        ds = sorted(dets.get(im["id"], []), key=lambda r: -r["score"])
        d_boxes = np.asarray([r["bbox"] for r in ds], dtype=float).reshape(-1, 4)
        g_boxes = np.asarray([a["bbox"] for a in real], dtype=float).reshape(-1, 4)
        ious = _iou_xywh(d_boxes, g_boxes)
        same_class = np.asarray([[r["category_id"] == a["category_id"] for a in crowds] for r in ds],
                                bool).reshape(len(ds), len(crowds))
        crowd_hit = ((_crowd_overlap(d_boxes, crowd) >= iou) & same_class).any(1)
        taken = np.zeros(len(real), bool)
        for i, r in enumerate(ds):  # greedy by score: the host-side bookkeeping of a report, not a training step
            cand = np.where(~taken & (ious[i] >= iou), ious[i], -1.0)
            if len(real) and cand.max() >= 0:
                j = int(cand.argmax())
                taken[j] = True
                matrix[index[real[j]["category_id"]], index[r["category_id"]]] += 1
            elif not crowd_hit[i]:
                matrix[bg, index[r["category_id"]]] += 1
        for j in np.where(~taken)[0]:
            matrix[index[real[j]["category_id"]], bg] += 1
    return matrix


def detection_report(gt: dict, results: Sequence[dict], iou: float = 0.5, confusion_iou: float = 0.5,
                     confusion_confidence: float | None = None) -> DetectionReport:
    """P/R/F1 curves at ``iou`` and the confusion matrix at ``confusion_iou`` and ``confusion_confidence``
    (``None``: the best-F1 confidence) of COCO ``results`` (xywh, original pixels) against COCO ``gt``."""
    gt = normalize_ground_truth(gt)
    gt["categories"] = sorted(gt["categories"], key=lambda c_: c_["id"])  # COCOeval's order (sorted ids)
    per_cat = _coco_matches(gt, list(results), iou)
    curves = [_curves(records) for records in per_cat]
    k = len(gt["categories"])
    c = len(CONFIDENCES)
    precision = np.stack([cv[0] for cv in curves]) if curves else np.zeros((0, c))
    recall = np.stack([cv[1] for cv in curves]) if curves else np.zeros((0, c))
    f1 = np.stack([cv[2] for cv in curves]) if curves else np.zeros((0, c))
    num_gt = np.asarray([cv[3] for cv in curves], dtype=np.int64).reshape(k)
    report = DetectionReport([c_["name"] for c_ in gt["categories"]], [c_["id"] for c_ in gt["categories"]], iou,
                             precision, recall, f1, num_gt, 0.0, np.zeros((k + 1, k + 1), np.int64), confusion_iou, 0.0)
    mean_f1 = report.mean_curves()[2]
    report.best_confidence = float(CONFIDENCES[int(mean_f1.argmax())]) if mean_f1.max() > 0 else 0.0
    conf = report.best_confidence if confusion_confidence is None else float(confusion_confidence)
    report.confusion_confidence = conf
    report.confusion = confusion_matrix(gt, results, confusion_iou, conf)
    return report
