"""Precision-recall curves from a COCO evaluation, as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from detkit.eval.coco_eval import EvalResult  # noqa: E402

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
