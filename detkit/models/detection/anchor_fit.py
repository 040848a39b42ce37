"""How well a detector's priors fit a dataset's boxes, and anchors fitted to them.

* :func:`anchor_coverage` — for the RPN: on every training image at the training size (no augmentation), the IoU
  of each ground-truth box with every anchor. The *best possible recall* (BPR) is the fraction of boxes that some
  anchor overlaps at least ``fg_iou`` (the RPN's foreground threshold, 0.7): a box below it is learned only
  through the matcher's low-quality fallback, from one poorly fitting anchor.
* :func:`fit_anchors` — sizes and aspect ratios per level from the boxes' shapes: k-means on ``(w, h)`` with the
  distance ``1 - IoU`` of centred boxes (YOLOv2's anchor clustering), seeded k-means++ start, the clusters sorted by
  area and dealt out to the levels finest first; each level's aspect ratios are quantiles of the ``h / w`` of the
  boxes nearest to its sizes. The level and per-level counts of the configured generator are kept, so the RPN
  head's shape does not change.
* :func:`decide_anchors` — the fit policy (``AnchorGenerator.fit``: ``auto``, ``always``, ``never``) and its
  thresholds (``FIT_*`` below): which anchors the RPN trains with. ``detkit-train`` only records the decision in the
  run's config, so the checkpoint and the saved config hold what was trained.
* :func:`size_range_report` — for the YOLO assigner: how many boxes each level's size range receives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from detkit.models.detection.anchors import AnchorGenerator
from detkit.models.detection.boxes import batched_box_iou

#: ``fit=auto`` replaces anchors whose best possible recall is below FIT_BELOW_BPR by fitted ones in two cases:
#:
#: * the configured anchors miss most boxes (median best IoU below FIT_BELOW_MEDIAN_IOU) and the fitted ones cover
#:   at least FIT_MIN_GAIN more of them: on photos the BCCD-sized anchors barely touch (raccoons: median 0.39)
#:   refitting took AP50 at 60 steps from 0.025 to 1.0 (BENCHMARKS.md);
#: * the fitted anchors cover nearly every box (best possible recall >= FIT_COVERS_ALL): the boxes have few
#:   shapes, as one class of large objects (the 33 raccoons at 320 px: 64% -> 100%; Oxford pets' heads: 85% ->
#:   99%), and refitting took AP50 at 90 steps from 0.81 to 1.00 on the raccoons and from 0.92 to 1.00 on the
#:   pets, AP from 0.41 to 0.88 and from 0.65 to 0.83 (2 seeds each, BENCHMARKS.md, issue 34).
#:
#: Otherwise the configured anchors are kept: where the boxes have many shapes, k-means concentrates sizes and
#: ratios on the dominant one, and refitting BCCD at 256 px (recall 25% -> 68% with its anchors of the time, median
#: 0.64) cost the SimCLR Faster R-CNN AP 0.132 -> 0.095 (STUDY.md).
FIT_BELOW_BPR, FIT_BELOW_MEDIAN_IOU, FIT_MIN_GAIN, FIT_COVERS_ALL = 0.9, 0.5, 0.05, 0.95


@dataclass
class Coverage:
    """Anchor coverage of a set of boxes: ``bpr`` (fraction with an anchor at IoU >= ``fg_iou``),
    ``anchors_per_box`` (mean number of such anchors), ``median_best_iou``, ``num_boxes``."""

    bpr: float
    anchors_per_box: float
    median_best_iou: float
    num_boxes: int
    fg_iou: float

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"best possible recall {self.bpr:.1%} of {self.num_boxes} boxes at IoU >= {self.fg_iou} "
                f"({self.anchors_per_box:.1f} anchors per box, median best IoU {self.median_best_iou:.2f})")


def grid_anchors(generator: AnchorGenerator, strides: Sequence[int], image_size: int) -> torch.Tensor:
    """All anchors ``[A, 4]`` of a ``image_size`` square input (its feature maps at ``strides``)."""
    feats = [torch.zeros(1, 1, -(-image_size // s), -(-image_size // s)) for s in strides]
    return torch.cat(generator(feats, (image_size, image_size)))


def anchor_coverage(boxes_per_image: Sequence[np.ndarray], anchors: torch.Tensor, fg_iou: float = 0.7) -> Coverage:
    """Coverage of ``boxes_per_image`` (each ``[N_i, 4]`` xyxy) by ``anchors [A, 4]`` placed on the image grid."""
    best, count = [], []
    for boxes in boxes_per_image:
        if len(boxes) == 0:
            continue
        iou = batched_box_iou(torch.as_tensor(boxes, dtype=torch.float32)[None], anchors[None])[0]  # [N, A]
        best.append(iou.max(dim=1).values)
        count.append((iou >= fg_iou).sum(dim=1).float())
    if not best:
        return Coverage(1.0, 0.0, 1.0, 0, fg_iou)
    best_t, count_t = torch.cat(best), torch.cat(count)
    return Coverage(float((best_t >= fg_iou).float().mean()), float(count_t.mean()), float(best_t.median()),
                    len(best_t), fg_iou)


def _shape_iou(wh: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """IoU of centred boxes: ``[N, 2] x [K, 2] -> [N, K]``."""
    inter = np.minimum(wh[:, None, 0], centres[None, :, 0]) * np.minimum(wh[:, None, 1], centres[None, :, 1])
    union = wh[:, None].prod(-1) + centres[None].prod(-1) - inter
    return inter / np.maximum(union, 1e-12)


def kmeans_iou(wh: np.ndarray, k: int, seed: int = 0, iterations: int = 50, restarts: int = 8) -> np.ndarray:
    """``k`` box shapes ``[k, 2]`` clustering ``wh [N, 2]`` by the distance ``1 - IoU`` (a cluster's centre is its
    members' median shape). Sorted by area.

    ``restarts`` k-means++ starts drawn from ``seed`` run, and the clustering whose boxes overlap their nearest
    centre most (mean IoU) is kept, as scikit-learn's ``n_init``: one start can merge two sizes or miss a group of
    boxes, and the anchors should be a property of the data rather than of one draw."""
    rng = np.random.default_rng(seed)
    wh = wh[(wh > 0).all(1)]
    if len(wh) <= k:  # every box is a centre (as (w, h) pairs), the largest repeated to make k
        if not len(wh):
            return np.ones((k, 2))
        shapes = wh[np.argsort(wh.prod(1), kind="stable")]
        return np.concatenate([shapes, np.repeat(shapes[-1:], k - len(shapes), 0)])
    best, best_fit = None, -1.0
    for _ in range(max(1, restarts)):
        centres = wh[[rng.integers(len(wh))]]
        while len(centres) < k:  # k-means++: far (low-IoU) shapes are likelier next centres
            d = 1 - _shape_iou(wh, centres).max(1)
            centres = np.vstack([centres, wh[rng.choice(len(wh), p=d / d.sum() if d.sum() > 0 else None)]])
        for _ in range(iterations):
            nearest = _shape_iou(wh, centres).argmax(1)
            new = np.array([np.median(wh[nearest == j], 0) if (nearest == j).any() else centres[j]
                            for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        fit = float(_shape_iou(wh, centres).max(1).mean())
        if fit > best_fit:
            best, best_fit = centres, fit
    return best[np.argsort(best.prod(1))]


def fit_anchors(wh: np.ndarray, sizes_per_level: Sequence[int], ratios_per_level: Sequence[int], seed: int = 0
                ) -> tuple[list[list[float]], list[list[float]]]:
    """Anchor ``sizes`` and ``aspect_ratios`` per level fitted to box shapes ``wh [N, 2]`` (letterboxed pixels),
    with the given number of sizes and of ratios on each level (see the module docstring)."""
    n_levels = len(sizes_per_level)
    centres = kmeans_iou(wh, int(sum(sizes_per_level)), seed)
    bounds = np.cumsum([0, *sizes_per_level])
    nearest = _shape_iou(wh, centres).argmax(1) if len(wh) else np.zeros(0, dtype=int)
    sizes, ratios = [], []
    for lvl in range(n_levels):
        own = centres[bounds[lvl]: bounds[lvl + 1]]
        sizes.append([round(float(np.sqrt(c[0] * c[1])), 1) for c in own])
        members = wh[(nearest >= bounds[lvl]) & (nearest < bounds[lvl + 1])]
        members = members if len(members) else (wh if len(wh) else np.ones((1, 2)))
        r = members[:, 1] / np.maximum(members[:, 0], 1e-6)
        n = ratios_per_level[lvl]
        quantiles = (np.arange(n) + 0.5) / n  # e.g. 3 ratios: the 1/6, 1/2 and 5/6 quantiles of h/w
        ratios.append([round(float(v), 2) for v in np.quantile(r, quantiles)])
    return sizes, ratios


def size_range_report(wh: np.ndarray, size_ranges: Sequence[Sequence[float]], strides: Sequence[int]) -> str:
    """How many boxes each YOLO level receives (by longer half-side ``max(w, h) / 2``)."""
    half = wh.max(1) / 2 if len(wh) else np.zeros(0)
    parts = []
    for (lo, hi), s in zip(size_ranges, strides):
        n = int(((half >= lo) & (half < hi)).sum())
        parts.append(f"stride {s} [{lo:g}, {hi:g}) px: {n} boxes ({n / max(1, len(half)):.0%})")
    return "; ".join(parts)


@dataclass
class AnchorDecision:
    """The anchors the RPN trains with (``sizes``, ``aspect_ratios``), whether they were fitted, and the coverage
    of the configured (and, unless ``fit=never``, the fitted) anchors."""

    sizes: list[list[float]]
    aspect_ratios: list[list[float]]
    fitted: bool
    configured: Coverage
    candidate: Coverage | None
    policy: str

    def report(self, configured_sizes: Sequence[Sequence[float]], configured_ratios: Sequence[Sequence[float]]
               ) -> dict:
        """The ``run.json`` entry: configured anchors and their coverage, the fitted ones (``None`` if kept)."""
        return {"configured": {"sizes": [list(s) for s in configured_sizes],
                               "aspect_ratios": [list(r) for r in configured_ratios]},
                "coverage": self.configured.to_json(),
                "fitted": {"sizes": self.sizes, "aspect_ratios": self.aspect_ratios,
                           "coverage": self.candidate.to_json()} if self.fitted and self.candidate else None}

    def __str__(self) -> str:
        if self.fitted:
            return (f"anchors fitted to the training boxes (fit={self.policy}): sizes {self.sizes}, aspect ratios "
                    f"{self.aspect_ratios}: {self.candidate}")
        if self.candidate is None:
            return "configured anchors kept (fit=never)"
        return (f"fitted anchors would give {self.candidate}: configured anchors kept (fit=auto refits below "
                f"{FIT_BELOW_BPR:.0%} best possible recall when the fitted anchors cover >= {FIT_COVERS_ALL:.0%} of "
                f"the boxes, or when the configured ones' median best IoU is below {FIT_BELOW_MEDIAN_IOU:.2f} and "
                f"fitting gains >= {100 * FIT_MIN_GAIN:.0f} points; fit=always forces it)")


def decide_anchors(generator: AnchorGenerator, boxes_per_image: Sequence[np.ndarray], wh: np.ndarray,
                   strides: Sequence[int], image_size: int, fg_iou: float = 0.7, seed: int = 0) -> AnchorDecision:
    """Apply ``generator.fit`` to the training boxes (letterboxed to ``image_size``: ``boxes_per_image`` xyxy and
    their shapes ``wh``) on feature maps at ``strides`` (the backbone's ``strides``): ``never`` keeps the
    configured anchors, ``always`` replaces them by :func:`fit_anchors`, ``auto`` replaces them when the
    ``FIT_*`` thresholds say so: the configured ones cover too few boxes and either the fitted ones cover nearly
    all of them or the configured ones miss most boxes and the fitted ones cover clearly more. ``seed`` seeds the
    k-means starts (``detkit-train`` keeps the default, so the decision is a function of the data alone)."""
    before = anchor_coverage(boxes_per_image, grid_anchors(generator, strides, image_size), fg_iou)
    keep = AnchorDecision([list(s) for s in generator.sizes], [list(r) for r in generator.aspect_ratios], False,
                          before, None, generator.fit)
    if generator.fit == "never":
        return keep
    sizes, ratios = fit_anchors(wh, [len(s) for s in generator.sizes], [len(r) for r in generator.aspect_ratios],
                                seed=seed)
    after = anchor_coverage(boxes_per_image, grid_anchors(AnchorGenerator(sizes, ratios), strides, image_size),
                            fg_iou)
    misses_most = before.median_best_iou < FIT_BELOW_MEDIAN_IOU and after.bpr >= before.bpr + FIT_MIN_GAIN
    better = before.bpr < FIT_BELOW_BPR and (misses_most or after.bpr >= FIT_COVERS_ALL)
    if generator.fit == "always" or better:
        return AnchorDecision(sizes, ratios, True, before, after, generator.fit)
    keep.candidate = after
    return keep
