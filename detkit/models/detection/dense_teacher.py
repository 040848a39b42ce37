"""Dense pseudo-labels for the one-stage detector (Dense Teacher, Zhou et al., ECCV 2022): the student learns the
teacher's raw per-cell outputs instead of boxes that survive a score threshold and NMS.

Why. Box pseudo-labels (:mod:`detkit.models.detection.pseudo_labels`) keep only what the teacher is sure of, so a
class it scores low (a small, rare class early in training) gets no pseudo-label at all while the classes it knows
get more: on BCCD at 5% of the labels YOLO's teacher pseudo-labelled almost no platelets and self-training traded
them for red cells (STUDY.md). Dense pseudo-labels pass on the teacher's whole class distribution at every cell it
ranks as foreground (soft targets), so a selected platelet cell scored 0.3 platelet / 0.5 red cell is taught as
exactly that, not as a red cell; and there is no score threshold or NMS to tune. What it does not fix: a cell ranked
below ``count`` is taught as background (objectness target 0, down-weighted by the focal term only), so an object
the teacher ranks lower than the others' cells is still pushed down, as in Dense Teacher.

**Which cells (region selection).** Per image, the teacher's cells ranked by score ``max_c sigmoid(obj) *
sigmoid(cls_c)``; the top ``count`` are the foreground. Dense Teacher takes a fixed top 1% of the cells, tuned on
COCO; how many cells an object covers depends on the data (BCCD's cells cover ~18% of the grid at 320 px under
detkit's centre sampling, COCO's objects far less), so ``count`` is instead the number of cells the detector's own
assigner makes positive per *labeled* image of the same step (:func:`positives_per_image`): the unlabeled images
come from the same distribution, so their expected foreground is the labeled images'. Computed on the device, with a
rank comparison instead of a data-dependent ``topk`` size: fixed shapes, no host read-back. ``per_class`` selection
(``semi.dense_per_class=true``) draws each class's cells by that class's own score, as many as the labeled images'
positive cells of that class per image (averaged over steps by the caller): a class the teacher scores lower than
the others everywhere (a small, rare class) is then selected at about its labeled share instead of hardly at all. A
cell chosen for two classes is one cell, taught as the class scoring it higher, so a class's recorded cells can fall
below its count.

**The losses** (over the student's outputs on the strong view; the teacher's on the weak view, same geometry):

- ``loss_obj``: objectness against the teacher's objectness probability at the selected cells and 0 elsewhere,
  with the quality focal weight ``|p - target|^gamma`` (Dense Teacher's QFL): over all cells, so easy background is
  down-weighted and an object the teacher ranked just below ``count`` is not a full-weight negative.
- ``loss_cls``: the classes against the teacher's class probabilities (soft, multi-label BCE) at the selected cells.
- ``loss_box``: the student's decoded box against the teacher's at the selected cells (GIoU/CIoU as the detector's),
  weighted by the teacher's score, so a cell ranked foreground with a low score moves the boxes little.

``loss_obj`` and ``loss_cls`` are divided by the number of selected cells (the supervised terms by the number of
positive cells), ``loss_box`` by the sum of its weights (a weighted mean); each is then scaled by the detector's own
``box/obj/cls`` weights. A soft-target BCE never reaches 0: ``loss_cls`` bottoms out at the teacher's entropy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from detkit.models.detection.losses import iou_loss, masked_mean
from detkit.models.detection.pseudo_labels import per_class_counts
from detkit.models.detection.yolo import centres_inside
from detkit.structures import Targets


class DenseSelection(NamedTuple):
    """The teacher's foreground cells of a batch (all ``[B, A]``): ``selected`` (bool), ``label`` (the class each cell
    is taught as: the teacher's best class, or with per-class selection the best of the classes that selected it)
    and ``score`` (the teacher's score of that class at the cell)."""

    selected: torch.Tensor
    score: torch.Tensor
    label: torch.Tensor


def positives_per_image(assigned: torch.Tensor, labels: torch.Tensor | None = None,
                        num_classes: int | None = None) -> torch.Tensor:
    """The mean number of positive cells per image of an assignment ``[B, A]`` (``-1``: background, else the index
    of a ground-truth box) on its device: a 0-d float tensor, or with the boxes' ``labels [B, G]`` and
    ``num_classes`` one count per class ``[C]``."""
    positive = assigned >= 0
    if labels is None:
        return positive.float().sum(1).mean()
    cell_labels = labels.gather(1, assigned.clamp(min=0))  # [B, A]
    return per_class_counts(cell_labels, positive, int(num_classes)).float() / assigned.shape[0]


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's rank along dim 1 by decreasing score (0: the highest); one stable sort, so ties (letterbox
    padding) rank in a fixed order."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    shape = [1] * scores.dim()
    shape[1] = scores.shape[1]
    ranks = torch.arange(scores.shape[1], device=scores.device).view(shape).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


def select_cells(teacher_raw: torch.Tensor, count: torch.Tensor | float) -> DenseSelection:
    """Per image, the cells the teacher scores highest: ``count`` of them (a number or a 0-d tensor; rounded), or
    with ``count`` of shape ``[C]`` (**per class**), for each class ``c`` the ``count[c]`` cells with the highest
    class-``c`` score, so a class the teacher scores lower than the others everywhere still gets its share.

    ``teacher_raw``: ``[B, A, 5 + C]`` raw outputs (``ltrb``, objectness logit, class logits). Cells are selected
    where their rank is below the count: the count may live on the device (no ``topk`` of a data-dependent size, no
    read-back). A cell's label is its best class (per class: its best class among those that selected it) and its
    score that class's ``sigmoid(obj) * sigmoid(cls)``."""
    probs = teacher_raw[..., 4:5].float().sigmoid() * teacher_raw[..., 5:].float().sigmoid()  # [B, A, C]
    count = torch.as_tensor(count, dtype=torch.float32, device=probs.device).round()
    if count.dim() == 0:
        score, label = probs.max(dim=-1)
        return DenseSelection(_ranks(score) < count, score, label)
    chosen = _ranks(probs) < count  # [B, A, C]: among the top count[c] cells of class c
    selected = chosen.any(-1)
    label = torch.where(selected, probs.masked_fill(~chosen, -1.0).argmax(-1), probs.argmax(-1))
    return DenseSelection(selected, probs.gather(-1, label[..., None])[..., 0], label)


def dense_pseudo_losses(student_raw: torch.Tensor, teacher_raw: torch.Tensor, student_boxes: torch.Tensor,
                        teacher_boxes: torch.Tensor, selection: DenseSelection, box_loss: str = "giou",
                        weights: tuple[float, float, float] = (5.0, 1.0, 1.0),
                        gamma: float = 2.0) -> dict[str, torch.Tensor]:
    """The student's dense unsupervised losses ``loss_box``, ``loss_obj``, ``loss_cls`` (weighted by ``weights`` =
    box, obj, cls) against the teacher's outputs at ``selection`` (see the module docstring).

    ``student_raw`` / ``teacher_raw``: ``[B, A, 5 + C]``; ``student_boxes`` / ``teacher_boxes``: their decoded boxes
    ``[B, A, 4]`` (``xyxy`` input pixels). Nothing flows back into the teacher."""
    teacher_raw, teacher_boxes = teacher_raw.detach().float(), teacher_boxes.detach().float()
    sel = selection.selected
    n = sel.float().sum().clamp(min=1.0)
    t_obj = torch.where(sel, teacher_raw[..., 4].sigmoid(), torch.zeros_like(teacher_raw[..., 4]))
    s_obj = student_raw[..., 4].float()
    focal = (s_obj.sigmoid() - t_obj).abs().pow(gamma).detach()
    loss_obj = (focal * F.binary_cross_entropy_with_logits(s_obj, t_obj, reduction="none")).sum() / n
    cls = F.binary_cross_entropy_with_logits(student_raw[..., 5:].float(), teacher_raw[..., 5:].sigmoid(),
                                             reduction="none").sum(-1)
    loss_cls = masked_mean(cls, sel, n)
    weight = selection.score.detach() * sel
    loss_box = (iou_loss(student_boxes.float(), teacher_boxes, box_loss) * weight).sum() / weight.sum().clamp(min=1e-6)
    wb, wo, wc = weights
    return {"loss_box": wb * loss_box, "loss_obj": wo * loss_obj, "loss_cls": wc * loss_cls}


def cell_hits(points: torch.Tensor, selection: DenseSelection, truth: Targets) -> tuple[torch.Tensor, torch.Tensor]:
    """How good the selected cells are, against ground truth ``truth`` (``[B, G]``): ``(inside_same,
    inside_other_only)``, both ``bool [B, A]``: selected cells whose centre (``points [A, 2]``) lies in a box of the
    class the teacher gives them, and selected cells lying in a box of another class and in none of theirs (a class
    confusion). Batched ``[B, A, G]`` masks, no host synchronisation."""
    inside = centres_inside(points, truth.boxes).transpose(1, 2) & truth.valid[:, None]  # [B, A, G], as the assigner
    same = selection.label[..., None] == truth.labels[:, None]  # [B, A, G]
    sel = selection.selected[..., None]
    inside_same = (inside & same & sel).any(2)
    return inside_same, (inside & ~same & sel).any(2) & ~inside_same
