"""COCO box evaluation with COCOeval semantics, by pycocotools (the reference) or faster-coco-eval (faster).

Both backends give the same 12 summary statistics (tests check it against pycocotools on random and official
inputs). Predictions enter as a COCO results list: ``{"image_id", "category_id" (original id), "bbox" [x, y, w, h]
in original image pixels, "score"}``.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from detkit.errors import UserError

STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("faster_coco_eval", "pycocotools")
_SUMMARY_LINES = (
    ("Average Precision", "(AP)", "0.50:0.95", "all", 100), ("Average Precision", "(AP)", "0.50", "all", 100),
    ("Average Precision", "(AP)", "0.75", "all", 100), ("Average Precision", "(AP)", "0.50:0.95", "small", 100),
    ("Average Precision", "(AP)", "0.50:0.95", "medium", 100), ("Average Precision", "(AP)", "0.50:0.95", "large", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "all", 1), ("Average Recall", "(AR)", "0.50:0.95", "all", 10),
    ("Average Recall", "(AR)", "0.50:0.95", "all", 100), ("Average Recall", "(AR)", "0.50:0.95", "small", 100),
    ("Average Recall", "(AR)", "0.50:0.95", "medium", 100), ("Average Recall", "(AR)", "0.50:0.95", "large", 100),
)


class PredictionError(UserError, ValueError):
    """A predictions file does not fit its ground truth (unknown image or category ids, malformed entries)."""


@dataclass
class EvalResult:
    """Evaluation output.

    Attributes:
        stats: the 12 COCO statistics under :data:`STAT_KEYS` (-1 where undefined, e.g. no small objects).
        per_class: per category ``{"id", "name", "AP", "AP50"}`` (-1 where the class has no ground truth).
        precision: COCOeval's precision array ``[T=10 IoUs, R=101 recall points, K classes, A=4 areas, M=3 maxDets]``.
        recall_thresholds: ``[R]`` recall points.
    """

    stats: dict[str, float]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    precision: np.ndarray | None = None
    recall_thresholds: np.ndarray | None = None

    def summary(self) -> str:
        """The 12 summary lines, formatted exactly as the official cocoapi printout of the fake-results example
        (``results/val2014_fake_eval_res.txt``), from :attr:`stats`."""
        lines = []
        for (title, kind, iou, area, dets), key in zip(_SUMMARY_LINES, STAT_KEYS):
            iou_str = f"{iou:<9}" if iou != "0.50:0.95" else iou
            lines.append(f" {title:<17} {kind} @[ IoU={iou_str} | area={area:>6s} | maxDets={dets:>3d} ] = "
                         f"{self.stats[key]:0.3f}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {**{k: float(v) for k, v in self.stats.items()}, "per_class": self.per_class}


def normalize_ground_truth(gt: dict) -> dict:
    """A copy of a COCO dict ready for COCOeval: optional keys (``iscrowd``, ``area``) filled in, and annotation
    ids renumbered ``1..N``.

    The renumbering matters: COCOeval records a detection's match as the matched ground truth's *id* and tests it
    for truth, so a ground-truth annotation with id 0 (as labelling tools export) silently counts as never matched.
    Results never refer to annotation ids, so renumbering changes nothing else.
    """
    annotations = []
    for new_id, ann in enumerate(gt["annotations"], start=1):
        ann = {**ann, "id": new_id}  # a shallow copy per record: the caller's dicts are left untouched
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
        annotations.append(ann)
    return {"info": {}, "licenses": [], **gt, "annotations": annotations}


def check_predictions(gt: dict, results: Sequence[dict]) -> None:
    """Raise :class:`PredictionError` naming the offending entries if ``results`` do not fit ``gt``."""
    image_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    bad_img, bad_cat, malformed = [], [], []
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(r):
            malformed.append(i)
            continue
        bbox = r["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            malformed.append(i)
        if r["image_id"] not in image_ids:
            bad_img.append((i, r["image_id"]))
        if r["category_id"] not in cat_ids:
            bad_cat.append((i, r["category_id"]))
    problems = []
    if malformed:
        problems.append(f"{len(malformed)} malformed entries (need image_id, category_id, bbox [x, y, w, h], "
                        f"score), e.g. index {malformed[:5]}")
    if bad_img:
        problems.append(f"{len(bad_img)} predictions name image ids not in the ground truth, e.g. "
                        + ", ".join(f"#{i}: image_id {v!r}" for i, v in bad_img[:5]))
    if bad_cat:
        problems.append(f"{len(bad_cat)} predictions name category ids not in the ground truth "
                        f"{sorted(cat_ids)}, e.g. " + ", ".join(f"#{i}: category_id {v!r}" for i, v in bad_cat[:5]))
    if problems:
        raise PredictionError("; ".join(problems))


def _run_pycocotools(gt: dict, results: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to each dict
        else:  # pycocotools' loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats), ev.eval["precision"], ev.params.recThrs, list(ev.params.catIds)


def _run_faster(gt: dict, results: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt)
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to each dict
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lambda *a, **k: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:12]), np.asarray(ev.eval["precision"]), np.asarray(ev.params.recThrs), \
        list(ev.params.catIds)


def _per_class(precision: np.ndarray, cat_ids: list, gt: dict) -> list[dict[str, Any]]:
    names = {c["id"]: c["name"] for c in gt["categories"]}
    rows = []
    for k, cid in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        p50 = precision[0, :, k, 0, -1]
        ap = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        ap50 = float(p50[p50 > -1].mean()) if (p50 > -1).any() else -1.0
        rows.append({"id": int(cid), "name": names.get(cid, str(cid)), "AP": ap, "AP50": ap50})
    return rows


def evaluate_coco(gt: dict | str | Path, results: Sequence[dict], backend: str = "faster_coco_eval") -> EvalResult:
    """Evaluate COCO results against ground truth.

    Args:
        gt: COCO ground-truth dict or json path (crowd annotations act as ignore regions, as in COCOeval).
        results: COCO results list (see the module docstring).
        backend: ``"faster_coco_eval"`` or ``"pycocotools"``.

    Raises:
        PredictionError: results name unknown image/category ids or are malformed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"evaluation backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(gt, dict):
        gt = json.loads(Path(gt).read_text())
    gt = normalize_ground_truth(gt)
    results = list(results)
    check_predictions(gt, results)
    if not gt["annotations"]:
        return EvalResult({k: -1.0 for k in STAT_KEYS})
    run = _run_faster if backend == "faster_coco_eval" and results else _run_pycocotools
    stats, precision, rec_thrs, cat_ids = run(gt, results)
    return EvalResult(dict(zip(STAT_KEYS, (float(s) for s in stats))), _per_class(precision, cat_ids, gt),
                      precision, np.asarray(rec_thrs))


def detections_to_results(boxes: torch.Tensor, scores: torch.Tensor, category_ids: torch.Tensor,
                          image_id: int) -> list[dict]:
    """One image's detections (``boxes [n, 4]`` xyxy in original pixels) -> COCO results (xywh)."""
    xywh = boxes.detach().float().cpu().clone()
    xywh[:, 2:] -= xywh[:, :2]
    return [{"image_id": int(image_id), "category_id": int(c), "bbox": [round(float(v), 2) for v in b],
             "score": round(float(s), 5)}
            for b, s, c in zip(xywh.tolist(), scores.detach().cpu().tolist(), category_ids.cpu().tolist())]


def write_metrics(path: str | Path, result: EvalResult, extra: dict | None = None) -> Path:
    """Write ``metrics.json``: the 12 stats as top-level floats, ``per_class``, and any extra keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result.to_json(), **(extra or {})}, indent=2))
    return path
