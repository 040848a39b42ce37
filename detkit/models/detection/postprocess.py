"""Post-processing: class-aware NMS over a whole batch, and capped, padded detections per image.

Two NMS implementations keep exactly the same boxes (greedy NMS: a box is dropped when a higher-scoring kept box
of its class overlaps it by IoU > threshold):

* ``"cluster"`` — Cluster-NMS (Zheng et al. 2020, "Enhancing Geometric Factors in Model Learning and Inference";
  Bolya et al., YOLACT++) on fixed-shape tensors: the score-sorted candidates' ``[N, K, K]`` "i suppresses j" mask
  (IoU > threshold, same class, i before j) is applied to the kept set until the kept set stops changing; that
  fixed point is greedy NMS. Everything stays on the device; the only host traffic is one boolean per
  ``check_every`` iterations to stop (none at all with ``exact=False``, which runs a fixed number of iterations
  and is exact only up to a suppression-chain length: see :func:`cluster_nms`). Measured: 1-4 iterations reach
  the fixed point on RPN proposals and on random boxes; a chain of ``n`` boxes, each overlapping the next, needs
  ``n - 1``. In an ONNX export (``torch.compiler.is_exporting()``) the exact form is ONNX's ``NonMaxSuppression``
  (the custom op ``detkit::greedy_nms``, translated by :mod:`detkit.export`): a traced graph cannot loop until the
  kept set stops changing.
* ``"torchvision"`` — ``torchvision.ops.batched_nms`` per image (a host loop). Its CUDA kernel copies an
  ``N x N/64`` bitmask to the host and reduces it there, which stalls a GPU; on a CPU it is the faster one.

``"auto"`` picks what ``scripts/bench_postprocess_eval.py`` and ``scripts/bench_gpu.py`` measured fastest on each
device (BENCHMARKS.md): torchvision on CPU, cluster on CUDA.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from detkit.models.detection.boxes import batched_box_iou, finite_boxes, small_boxes
from detkit.structures import Detections

STRATEGIES = ("auto", "cluster", "torchvision")


def resolve_strategy(strategy: str, device: torch.device) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"nms strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        return "torchvision" if device.type == "cpu" else "cluster"
    return strategy


def cluster_nms(boxes: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor | None, iou_threshold: float,
                exact: bool = True, iterations: int = 4) -> torch.Tensor:
    """Greedy NMS of score-sorted candidates, batched: ``boxes [N, K, 4]`` (xyxy, decreasing score along ``K``),
    ``valid [N, K]``, ``labels [N, K]`` (NMS within a class; ``None``: one class) -> ``keep [N, K]`` bool.

    With ``exact=True`` the kept set is iterated to its fixed point (greedy NMS), checking convergence on the host
    once every ``iterations`` iterations (while exporting: ONNX's ``NonMaxSuppression``, see the module docstring);
    with ``exact=False`` exactly ``t = iterations`` iterations run and nothing reaches the host. What that keeps:

    * Let a candidate's *depth* be 0 when no valid candidate before it suppresses it (same class, IoU above the
      threshold), else 1 + the largest depth of the candidates that suppress it (the longest suppression chain
      ending at it). After ``t`` iterations every candidate of depth ``<= t`` is kept or dropped exactly as greedy
      NMS does; so all agree when no candidate is deeper than ``t`` (a chain of ``n`` boxes, each suppressing the
      next, needs ``t >= n - 1``).
    * Deeper candidates may differ, in one direction: an even ``t`` keeps every box greedy NMS keeps and perhaps
      more, an odd ``t`` only boxes greedy NMS keeps, perhaps fewer (each iteration maps a superset of greedy's
      kept set to a subset and back). A chain of 24 boxes (IoU 0.6 with the next, 1/3 with the one after, NMS 0.5):
      greedy keeps 12 (every other box); ``t = 4`` keeps 22, ``t = 16`` keeps 16.

    No fixed ``t`` below ``K - 1`` is exact on every input (a chain of ``K`` boxes), and greedy NMS has no
    shallower dense formulation (it is the lexicographically first maximal independent set of the "suppresses"
    graph, a P-complete problem); exactness without a host synchronisation costs ``K - 1`` iterations.
    """
    if exact and torch.compiler.is_exporting():
        if labels is None:
            labels = torch.zeros(valid.shape, dtype=torch.int64, device=valid.device)
        return torch.ops.detkit.greedy_nms(boxes.float(), labels.long(), valid, float(iou_threshold))
    k = boxes.shape[1]
    upper = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)
    suppresses = (batched_box_iou(boxes, boxes) > iou_threshold) & upper & valid[:, :, None]
    if labels is not None:
        suppresses &= labels[:, :, None] == labels[:, None, :]
    keep = valid
    while True:
        for _ in range(iterations):
            previous = keep
            keep = valid & ~(suppresses & keep[:, :, None]).any(dim=1)
        # the fixed point is reached when an iteration changes nothing: one boolean to the host per round
        if not exact or torch.equal(keep, previous):
            return keep


@torch.library.custom_op("detkit::greedy_nms", mutates_args=())
def greedy_nms(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Exact greedy NMS as one opaque op for ``torch.export``: ``cluster_nms(boxes, valid, labels, iou_threshold)``
    (candidates sorted by decreasing score; ``labels`` int64, ``[N, K]``) -> ``keep [N, K]``. Its ONNX form is
    ``NonMaxSuppression`` (:func:`detkit.export.greedy_nms_onnx`); here it runs Cluster-NMS to its fixed point."""
    return cluster_nms(boxes, valid, labels, iou_threshold, exact=True).clone()


@greedy_nms.register_fake
def _(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    return torch.empty_like(valid)


def _first_kept(keep: torch.Tensor, max_det: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[B, max_det]`` of the first ``max_det`` True entries of each row of ``keep [B, N]`` (in order) and
    their validity, without a host synchronisation (a top-k over a position key)."""
    n = keep.shape[1]
    position = torch.arange(n, 0, -1, device=keep.device)  # earlier = larger
    key = torch.where(keep, position, torch.zeros_like(position))
    top = key.topk(min(max_det, n), dim=1).indices
    return top, keep.gather(1, top)


def _pad_to(t: torch.Tensor, size: int, value: float = 0) -> torch.Tensor:
    if t.shape[1] >= size:
        return t
    pad = t.new_full((t.shape[0], size - t.shape[1], *t.shape[2:]), value)
    return torch.cat([t, pad], dim=1)


def batched_multiclass_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                           iou_threshold: float, max_det: int, strategy: str = "auto",
                           exact: bool = True, iterations: int = 4) -> Detections:
    """Class-aware NMS for every image of a batch.

    Args:
        boxes: ``[B, N, 4]`` xyxy candidates; scores: ``[B, N]``; labels: ``[B, N]`` int64 (NMS only suppresses
            within a class); valid: ``[B, N]`` bool, candidates to consider (non-finite boxes never are).
        iou_threshold: suppression IoU; max_det: detections kept per image, highest scores first.
        strategy: ``"cluster"``, ``"torchvision"`` or ``"auto"`` (see the module docstring).
        exact, iterations: cluster strategy only; see :func:`cluster_nms`.

    Returns:
        :class:`Detections` padded to ``[B, max_det]``: the same boxes as a per-image loop of
        ``torchvision.ops.batched_nms`` followed by taking the first ``max_det``.
    """
    valid = valid & finite_boxes(boxes) & torch.isfinite(scores)
    if resolve_strategy(strategy, boxes.device) == "torchvision":
        return _torchvision_nms(boxes, scores, labels, valid, iou_threshold, max_det)
    key = scores.float().masked_fill(~valid, float("-inf"))
    if torch.compiler.is_exporting():  # ONNX has no stable sort; TopK orders ties by index in onnxruntime
        order = key.topk(key.shape[1], dim=1).indices
    else:
        order = key.argsort(dim=1, descending=True, stable=True)  # stable, as torchvision's CPU kernel
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    scores, labels, valid = scores.gather(1, order), labels.gather(1, order), valid.gather(1, order)
    keep = cluster_nms(boxes, valid, labels, iou_threshold, exact=exact, iterations=iterations)
    top, top_valid = _first_kept(keep, max_det)
    out = Detections(boxes.gather(1, top[..., None].expand(-1, -1, 4)), scores.gather(1, top),
                     labels.gather(1, top), top_valid)
    return Detections(*(_pad_to(t, max_det) for t in out))


def _torchvision_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                     iou_threshold: float, max_det: int) -> Detections:
    b = boxes.shape[0]
    out = Detections(boxes.new_zeros(b, max_det, 4), scores.new_zeros(b, max_det),
                     labels.new_zeros(b, max_det), torch.zeros(b, max_det, dtype=torch.bool, device=boxes.device))
    for i in range(b):  # torchvision's kernels take one image; its CUDA nms also synchronises per call
        idx = valid[i].nonzero(as_tuple=True)[0]
        keep = idx[batched_nms(boxes[i, idx].float(), scores[i, idx].float(), labels[i, idx], iou_threshold)]
        keep = keep[:max_det]
        n = len(keep)
        out.boxes[i, :n], out.scores[i, :n], out.labels[i, :n] = boxes[i, keep], scores[i, keep], labels[i, keep]
        out.valid[i, :n] = True
    return out


class PostProcess:
    """Detections from per-class scores: score threshold, top-k candidates, class-aware NMS, cap per image.

    The config node ``inference`` of the RoI heads and of the YOLO detector.

    Args:
        score_thresh: candidates scoring at most this are dropped.
        nms_thresh: NMS IoU threshold.
        topk_candidates: highest-scoring (box, class) pairs per image that enter NMS.
        detections_per_img: detections kept per image.
        nms: NMS strategy (``auto``, ``cluster``, ``torchvision``; see the module docstring).
        min_size: boxes narrower or shorter than this (pixels) are dropped.
    """

    def __init__(self, score_thresh: float = 0.05, nms_thresh: float = 0.5, topk_candidates: int = 1000,
                 detections_per_img: int = 100, nms: str = "auto", min_size: float = 1e-2) -> None:
        if nms not in STRATEGIES:
            raise ValueError(f"nms strategy must be one of {STRATEGIES}, got {nms!r}")
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.topk_candidates, self.detections_per_img = topk_candidates, detections_per_img
        self.nms, self.min_size = nms, min_size
        #: ``None``: cluster NMS runs to its fixed point (a host check every 4 iterations; ONNX's
        #: NonMaxSuppression in an export); an int: exactly that many iterations, nothing read back, exact only on
        #: suppression chains up to that length (:func:`cluster_nms`).
        self.fixed_iterations: int | None = None

    def __call__(self, boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor | None = None) -> Detections:
        """``boxes`` ``[B, N, 4]`` (shared by the classes) or ``[B, N, C, 4]`` (class-specific), xyxy input pixels;
        ``scores [B, N, C]``; ``valid [B, N]`` (padding) -> padded :class:`Detections` ``[B, detections_per_img]``.
        """
        b, n, c = scores.shape
        scores = scores.float()
        per_class = boxes.dim() == 4
        keep = scores > self.score_thresh
        if valid is not None:
            keep &= valid[..., None]
        box_ok = finite_boxes(boxes) & ~small_boxes(boxes, self.min_size)
        keep &= box_ok if per_class else box_ok[..., None]
        flat = scores.masked_fill(~keep, -1.0).reshape(b, n * c)
        top = flat.topk(min(self.topk_candidates, n * c), dim=1).indices  # [B, K], sorted by score
        top_scores = flat.gather(1, top)
        labels = top % c
        src = boxes.reshape(b, n * c, 4) if per_class else boxes
        box_index = top if per_class else top // c
        cand = src.gather(1, box_index[..., None].expand(-1, -1, 4))
        return batched_multiclass_nms(cand, top_scores, labels, top_scores > self.score_thresh, self.nms_thresh,
                                      self.detections_per_img, self.nms, exact=self.fixed_iterations is None,
                                      iterations=self.fixed_iterations or 4)
