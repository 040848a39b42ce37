"""Plots of an evaluation, as PNG (matplotlib, no display needed): precision-recall curves, precision/recall/F1
against confidence, and the confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from detkit.eval.coco_eval import EvalResult  # noqa: E402
from detkit.eval.report import CONFIDENCES, DetectionReport  # noqa: E402

#: Index of IoU 0.5 and 0.75 in COCOeval's 10 IoU thresholds (0.50, 0.55, ..., 0.95).
IOU_INDEX = {0.5: 0, 0.75: 5}


def plot_pr_curves(result: EvalResult, path: str | Path) -> Path | None:
    """One panel per IoU (0.5, 0.75): a precision-recall curve per class (all areas, 100 detections).

    Returns the written path, or ``None`` when the evaluation has no precision array (no ground truth).
    """
    if result.precision is None:
        return None
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (iou, t) in zip(axes, IOU_INDEX.items()):
        for k, row in enumerate(result.per_class):
            p = result.precision[t, :, k, 0, -1]
            if (p < 0).all():
                continue
            ap = p[p > -1].mean()
            ax.plot(result.recall_thresholds, p.clip(min=0), label=f"{row['name']} (AP{int(iou * 100)} {ap:.3f})")
        ax.set(title=f"IoU {iou}", xlabel="recall", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    axes[0].set_ylabel("precision")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_f1_curves(report: DetectionReport, path: str | Path) -> Path:
    """Precision, recall and F1 against confidence (IoU ``report.iou``): one line per class and a thick line for
    all classes, the best-F1 confidence marked."""
    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    mean = report.mean_curves()
    best = report.best_confidence
    for ax, title, per_class, all_classes in zip(axes, ("precision", "recall", "F1"),
                                                 (report.precision, report.recall, report.f1), mean):
        for k, name in enumerate(report.names):
            if report.present[k]:
                ax.plot(CONFIDENCES, per_class[k], lw=1, alpha=0.7, label=name)
        ax.plot(CONFIDENCES, all_classes, lw=2.5, color="k", label="all classes")
        i = int(abs(CONFIDENCES - best).argmin())
        ax.axvline(best, ls="--", color="gray")
        label = f"{all_classes[i]:.2f} at {best:.3f}" if all_classes[i] == all_classes[i] else f"at {best:.3f}"
        ax.set(title=f"{title} (IoU {report.iou}); best-F1 confidence: {label}", xlabel="confidence", xlim=(0, 1),
               ylim=(0, 1.02))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion_matrix(report: DetectionReport, path: str | Path) -> Path:
    """The confusion matrix as counts (rows ground truth, columns prediction, background last)."""
    path = Path(path)
    labels = [*report.names, "background"]
    m = report.confusion
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n))
    ax.imshow(m / max(1, m.max()), cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] > 0.6 * m.max() else "black")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set(xlabel="prediction", ylabel="ground truth",
           title=f"IoU {report.confusion_iou}, confidence >= {report.confusion_confidence:.3f}")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
