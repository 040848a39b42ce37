"""The files an evaluation leaves in its run directory: ``metrics.json`` (COCO statistics, per-class AP, AP50,
precision, recall and F1, the report's numbers), ``predictions.json`` (the COCO results evaluated),
``pr_curves.png``, ``f1_curves.png``, ``confusion_matrix.png`` and, when asked, ``report.html`` (the results
browser). Written by ``detkit-train`` after training and by ``detkit-eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from detkit.eval.coco_eval import EvalResult, write_metrics
from detkit.eval.html_report import build_report
from detkit.eval.curves import plot_confusion_matrix, plot_f1_curves, plot_pr_curves
from detkit.eval.report import detection_report


def write_evaluation(out: Path, result: EvalResult, gt: dict, results: Sequence[dict], extra: dict | None = None,
                     iou: float = 0.5, confusion_iou: float = 0.5,
                     confusion_confidence: float | None = None, html_images: Path | None = None,
                     title: str = "detkit evaluation") -> dict[str, Path]:
    """Write the evaluation files into ``out``; returns their paths by kind (``metrics``, ``predictions``,
    ``pr_curves``, ``f1_curves``, ``confusion_matrix``; the plots only when the ground truth has boxes; ``report``
    when ``html_images``, the images' root, is given)."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    extra = dict(extra or {})
    if gt.get("annotations"):
        report = detection_report(gt, results, iou, confusion_iou, confusion_confidence)
        by_id = {row["id"]: row for row in report.per_class()}
        result.per_class = [{**row, **{k: v for k, v in by_id.get(row["id"], {}).items() if k != "id"}}
                            for row in result.per_class]
        extra["report"] = report.to_json()
        paths["f1_curves"] = plot_f1_curves(report, out / "f1_curves.png")
        paths["confusion_matrix"] = plot_confusion_matrix(report, out / "confusion_matrix.png")
    paths["metrics"] = write_metrics(out / "metrics.json", result, extra)
    paths["predictions"] = out / "predictions.json"
    paths["predictions"].write_text(json.dumps(list(results)))
    pr = plot_pr_curves(result, out / "pr_curves.png")
    if pr is not None:
        paths["pr_curves"] = pr
    if html_images is not None:
        metrics = json.loads(paths["metrics"].read_text())
        paths["report"] = build_report(out, gt, results, Path(html_images), metrics, title)
    return paths
