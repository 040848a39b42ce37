"""ONNX export of a trained detector: one graph from uint8 images to padded detections, NMS included.

The graph's input is ``images uint8 [B, 3, S, S]``: RGB images letterboxed as detkit does (resized so the longer
side is ``S``, the checkpoint's training size unless given, and padded at the bottom/right with grey 114;
:class:`detkit.data.transforms.LetterboxImage`), decoded as detkit reads images: the stored pixels, EXIF
orientation ignored (:mod:`detkit.data.image_files`; boxes come out in those pixels). Normalisation happens
inside. Outputs, in input pixels:

* ``boxes float32 [B, D, 4]`` xyxy, ``scores float32 [B, D]``, ``labels int64 [B, D]`` (contiguous class index
  ``0..C-1``; the category ids and names are in the ``.json`` written beside the model),
* ``num_detections int64 [B]``: the first ``num_detections[i]`` rows of image ``i`` are detections, the rest
  padding (``D`` = ``detections_per_img``).

The graph is the model's own fixed-shape inference path, traced by ``torch.export`` (``torch.onnx.export(...,
dynamo=True)``): top-k candidate selection as dense tensor ops, exact greedy NMS as ONNX's ``NonMaxSuppression``
(the RPN's per-level NMS and the class-aware NMS of the detections; see :func:`greedy_nms_onnx`), and
torchvision's RoIAlign (ONNX ``RoiAlign``) for Faster R-CNN. It keeps the boxes ``predict`` keeps, whatever the
length of the suppression chains (Cluster-NMS with a fixed iteration count, which a traced graph would need, does
not). Nothing from detkit or torch is needed to run it: ``onnxruntime.InferenceSession(path).run(None, {"images":
batch})``.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from detkit.errors import UserError

log = logging.getLogger(__name__)

OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]


class ExportError(UserError, ValueError):
    """The file is not a detkit detector checkpoint, or the model cannot be exported as asked."""


class ExportableDetector(nn.Module):
    """``images uint8 [B, 3, S, S]`` -> ``(boxes, scores, labels, num_detections)`` (see the module docstring).

    A copy of ``detector`` switched to its export path: exact greedy NMS on fixed-shape tensors (the cluster
    strategy, which becomes ONNX's ``NonMaxSuppression`` when exported) and torchvision's RoIAlign. The original
    detector is left as it was."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = copy.deepcopy(detector).eval()
        self.eval()
        for module in self.detector.modules():
            if hasattr(module, "nms") and isinstance(getattr(module, "nms"), str):  # the RPN
                module.nms = "cluster"
                if hasattr(module, "nms_iterations"):
                    module.nms_iterations = None  # exact
            if getattr(module, "impl", None) in ("auto", "gather"):  # the RoI pooler
                module.impl = "torchvision"
        for post in _postprocessors(self.detector):
            post.nms, post.fixed_iterations = "cluster", None  # exact

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dets = self.detector.predict(images)
        return dets.boxes.float(), dets.scores.float(), dets.labels, dets.valid.sum(dim=1)


def _postprocessors(detector: nn.Module) -> list:
    from detkit.models.detection.postprocess import PostProcess

    found = [v for m in detector.modules() for v in vars(m).values() if isinstance(v, PostProcess)]
    return list({id(p): p for p in found}.values())


def greedy_nms_onnx(boxes, labels, valid, iou_threshold: float):
    """ONNX translation of ``detkit::greedy_nms`` (:func:`detkit.models.detection.postprocess.greedy_nms`):
    ``boxes float [N, K, 4]`` sorted by decreasing score, ``labels int64 [N, K]``, ``valid bool [N, K]`` ->
    ``keep bool [N, K]``, by ``NonMaxSuppression`` with one score row per class.

    The scores given to ``NonMaxSuppression`` are the candidates' ranks (``K`` for the first, ``1`` for the last;
    0 for other classes and invalid candidates, below its score threshold 0.5), so it visits the candidates in
    the graph's order whatever the ties among the real scores, and suppresses within a class, as greedy NMS (IoU
    strictly above ``iou_threshold``) does."""
    from onnxscript import BOOL, FLOAT
    from onnxscript import opset18 as op

    k = op.Shape(labels, start=1, end=2)  # [1]
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    rank = op.Cast(op.Range(op.Squeeze(k), zero, op.Constant(value_int=-1)), to=FLOAT.dtype)  # K .. 1, exact < 2**24
    classes = op.Range(zero, op.Add(op.ReduceMax(labels, keepdims=0), one), one)  # [C]
    member = op.And(op.Equal(op.Unsqueeze(labels, [1]), op.Unsqueeze(classes, [0, 2])), op.Unsqueeze(valid, [1]))
    scores = op.Where(member, rank, op.Constant(value_float=0.0))  # [N, C, K]
    selected = op.NonMaxSuppression(boxes, scores, k, op.Constant(value_float=float(iou_threshold)),
                                    op.Constant(value_float=0.5))  # [M, 3]: (n, class, k)
    index = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # [M, 2]
    ones = op.Expand(op.Constant(value_ints=[1]), op.Shape(selected, start=0, end=1))
    zeros = op.Expand(zero, op.Shape(labels))  # int64 [N, K]
    return op.Cast(op.ScatterND(zeros, index, ones), to=BOOL.dtype)


def _custom_translations() -> dict:
    import detkit.models.detection.postprocess  # noqa: F401 (registers detkit::greedy_nms)

    return {torch.ops.detkit.greedy_nms.default: greedy_nms_onnx}


def load_detector(checkpoint: str | Path):
    """The :class:`~detkit.lit.detection_module.DetectionModule` of a checkpoint, or :class:`ExportError`
    saying why the file is not one."""
    from detkit.lit.detection_module import DetectionModule

    path = Path(checkpoint)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    try:
        return DetectionModule.from_checkpoint(path)
    except ExportError:
        raise
    except Exception as e:  # a SimCLR encoder file, another library's checkpoint, a corrupt file...
        raise ExportError(f"{path} is not a detkit detector checkpoint (written by detkit-train): {e}") from e


def export_onnx(module, path: str | Path, image_size: int | None = None, batch_size: int = 1,
                dynamic_batch: bool = True, half: bool = False, opset: int = 18) -> Path:
    """Export ``module`` (a ``DetectionModule``) to ONNX at ``path``; also writes ``path.json`` with the
    categories, input size and output layout. Returns ``path``."""
    size = int(image_size or module.hparams.get("image_size") or 320)
    if half:
        raise ExportError("half=true is not supported yet: export in fp32 (onnxruntime's CPU provider computes in "
                          "fp32; for fp16 on a GPU convert the fp32 graph, e.g. with onnxconverter-common)")
    wrapper = ExportableDetector(module.inference_model)
    example = torch.zeros(max(batch_size, 2 if dynamic_batch else 1), 3, size, size, dtype=torch.uint8)
    dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None
    if not dynamic_batch:
        example = example[:batch_size]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(wrapper, (example,), str(path), dynamo=True, opset_version=opset,
                          input_names=["images"], output_names=OUTPUT_NAMES, dynamic_shapes=dynamic,
                          custom_translation_table=_custom_translations(), external_data=False, verbose=False)
    meta = {"input": {"name": "images", "dtype": "uint8", "shape": ["batch" if dynamic_batch else batch_size, 3,
                                                                    size, size],
                      "letterbox": "resize the longer side to image_size, pad bottom/right with 114 (RGB)",
                      "decode": "RGB uint8 of the stored pixels: ignore EXIF orientation (as detkit reads images; "
                                "boxes are in the stored pixels)"},
            "outputs": {"boxes": "float32 [B, D, 4] xyxy input pixels", "scores": "float32 [B, D]",
                        "labels": "int64 [B, D] class index into categories", "num_detections": "int64 [B]"},
            "image_size": size, "categories": module.categories.to_list(), "half": half,
            "nms": "greedy, class-aware (ONNX NonMaxSuppression)"}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path
