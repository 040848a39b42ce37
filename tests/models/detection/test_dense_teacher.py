"""Dense pseudo-labels (semi.pseudo_labels=dense, YOLO): which cells the teacher's outputs teach, and what each loss
term takes from them, on hand-built outputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detkit.models.detection.dense_teacher import (DenseSelection, cell_hits, dense_pseudo_losses,
                                                   positives_per_image, select_cells)
from detkit.models.detection.yolo import decode_ltrb
from detkit.structures import Targets


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def raw_outputs(obj: list[list[float]], cls: list[list[list[float]]]) -> torch.Tensor:
    """``[B, A, 5 + C]`` raw outputs from objectness and class probabilities (boxes: zero distances)."""
    obj_t = torch.tensor(obj).logit()
    cls_t = torch.tensor(cls).logit()
    return torch.cat([torch.zeros(*obj_t.shape, 4), obj_t[..., None], cls_t], -1)


def test_the_teacher_selects_its_highest_scoring_cells_per_image_as_many_as_asked():
    # image 0: scores (obj x best class) 0.9*0.5=0.45, 0.5*0.88=0.44, 0.1*0.9=0.09, 0.8*0.8=0.64; image 1 reversed
    obj = [[0.9, 0.5, 0.1, 0.8], [0.8, 0.1, 0.5, 0.9]]
    cls = [[[0.5, 0.1], [0.2, 0.88], [0.9, 0.1], [0.1, 0.8]], [[0.1, 0.8], [0.9, 0.1], [0.2, 0.88], [0.5, 0.1]]]
    sel = select_cells(raw_outputs(obj, cls), torch.tensor(2.0))
    assert sel.selected.tolist() == [[True, False, False, True], [True, False, False, True]]
    assert sel.label.tolist() == [[0, 1, 0, 1], [1, 0, 1, 0]]  # each cell's best class
    assert torch.allclose(sel.score[0], torch.tensor([0.45, 0.44, 0.09, 0.64]), atol=1e-5)
    assert select_cells(raw_outputs(obj, cls), 3.4).selected.sum(1).tolist() == [3, 3]  # rounded
    assert select_cells(raw_outputs(obj, cls), 0.0).selected.sum() == 0
    assert select_cells(raw_outputs(obj, cls), 9.0).selected.all()  # more than the grid: every cell


def test_the_count_is_the_labeled_images_positive_cells_per_image():
    assigned = torch.tensor([[-1, 0, 0, 1, -1], [-1, -1, -1, -1, 2], [-1, -1, -1, -1, -1]])
    assert float(positives_per_image(assigned)) == pytest.approx(4 / 3)


def selection(selected: list[list[bool]], score: list[list[float]]) -> DenseSelection:
    sel = torch.tensor(selected)
    return DenseSelection(sel, torch.tensor(score), torch.zeros_like(sel, dtype=torch.int64))


def boxes(b: int, a: int) -> torch.Tensor:
    xy = torch.arange(b * a, dtype=torch.float32).view(b, a, 1) * 20
    return torch.cat([xy, xy, xy + 10, xy + 10], -1)


def test_only_the_selected_cells_carry_class_and_box_terms_and_the_objectness_targets_the_teachers():
    torch.manual_seed(0)
    b, a, c = 2, 5, 3
    teacher = torch.randn(b, a, 5 + c)
    student = torch.randn(b, a, 5 + c, requires_grad=True)
    sel = selection([[True, False, True, False, False], [False, False, False, False, True]],
                    [[0.9, 0.1, 0.5, 0.2, 0.1], [0.1, 0.1, 0.1, 0.1, 0.7]])
    t_boxes, s_boxes = boxes(b, a), boxes(b, a) + torch.randn(b, a, 4)
    losses = dense_pseudo_losses(student, teacher, s_boxes, t_boxes, sel, weights=(1.0, 1.0, 1.0))
    # by hand: class BCE against the teacher's probabilities, summed over classes, mean over the 3 selected cells
    cls = F.binary_cross_entropy_with_logits(student[..., 5:], teacher[..., 5:].sigmoid(), reduction="none").sum(-1)
    assert float(losses["loss_cls"].detach()) == pytest.approx(float(cls[sel.selected].sum() / 3), rel=1e-5)
    # objectness: the teacher's probability at the selected cells, 0 elsewhere, focal-weighted, over every cell
    target = torch.where(sel.selected, teacher[..., 4].sigmoid(), torch.zeros(b, a))
    p = student[..., 4].sigmoid()
    bce = F.binary_cross_entropy_with_logits(student[..., 4], target, reduction="none")
    expected = ((p - target).abs() ** 2 * bce).sum() / 3
    assert float(losses["loss_obj"].detach()) == pytest.approx(float(expected), rel=1e-5)
    # gradients: class and box terms reach only the selected cells; objectness reaches every cell
    (losses["loss_cls"] + losses["loss_box"]).backward()
    touched = student.grad[..., 5:].abs().sum(-1) > 0
    assert torch.equal(touched, sel.selected)
    student.grad = None
    dense_pseudo_losses(student, teacher, s_boxes, t_boxes, sel)["loss_obj"].backward()
    assert (student.grad[..., 4] != 0).all()


def test_the_box_term_is_zero_on_the_teachers_own_boxes_and_weighted_by_the_teachers_score():
    b, a, c = 1, 3, 2
    raw = torch.zeros(b, a, 5 + c)
    t_boxes = boxes(b, a)
    sel = selection([[True, True, False]], [[0.9, 0.1, 0.8]])
    same = dense_pseudo_losses(raw, raw, t_boxes.clone(), t_boxes, sel, weights=(1.0, 1.0, 1.0))
    assert float(same["loss_box"]) == pytest.approx(0.0, abs=1e-6)
    off = t_boxes.clone()
    off[0, 1] += torch.tensor([5.0, 5.0, 5.0, 5.0])  # the low-scoring selected cell's box is wrong: GIoU loss g
    g = float(dense_pseudo_losses(raw, raw, off, t_boxes, sel, weights=(1.0, 1.0, 1.0))["loss_box"])
    off2 = t_boxes.clone()
    off2[0, 0] += torch.tensor([5.0, 5.0, 5.0, 5.0])  # the same error on the high-scoring cell weighs 9x more
    g2 = float(dense_pseudo_losses(raw, raw, off2, t_boxes, sel, weights=(1.0, 1.0, 1.0))["loss_box"])
    assert g > 0 and g2 == pytest.approx(9 * g, rel=1e-5)
    off3 = t_boxes.clone()
    off3[0, 2] += 5.0  # an unselected cell's box does not count
    assert float(dense_pseudo_losses(raw, raw, off3, t_boxes, sel)["loss_box"]) == pytest.approx(0.0, abs=1e-6)


def test_the_teacher_gets_no_gradient_and_the_detectors_weights_scale_the_terms():
    torch.manual_seed(1)
    teacher = torch.randn(1, 4, 7, requires_grad=True)
    student = torch.randn(1, 4, 7, requires_grad=True)
    sel = selection([[True, False, True, True]], [[0.5, 0.2, 0.9, 0.4]])
    points, strides = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]]), torch.full((4,), 8.0)
    t_boxes = decode_ltrb(points, strides, teacher[..., :4])  # the teacher's boxes carry its graph
    s_boxes = decode_ltrb(points, strides, student[..., :4])
    one = dense_pseudo_losses(student, teacher, s_boxes, t_boxes, sel, weights=(1.0, 1.0, 1.0))
    scaled = dense_pseudo_losses(student, teacher, s_boxes, t_boxes, sel, weights=(5.0, 2.0, 3.0))
    for k, w in (("loss_box", 5.0), ("loss_obj", 2.0), ("loss_cls", 3.0)):
        assert float(scaled[k].detach()) == pytest.approx(w * float(one[k].detach()), rel=1e-6)
    sum(scaled.values()).backward()
    assert teacher.grad is None and student.grad is not None and (student.grad[..., :4] != 0).any()


def test_cells_are_right_inside_a_box_of_their_class_and_confused_inside_only_another_classs():
    points = torch.tensor([[5.0, 5.0], [25.0, 25.0], [50.0, 50.0], [8.0, 8.0]])  # [A, 2] cell centres
    truth = Targets.from_list([{"boxes": torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]]),
                                "labels": torch.tensor([0, 1])}])
    sel = DenseSelection(torch.tensor([[True, True, True, False]]), torch.ones(1, 4),
                         torch.tensor([[0, 0, 1, 0]]))
    # cell 0 (class 0) in the class-0 box: right; cell 1 (class 0) in the class-1 box: confused; cell 2 on nothing;
    # cell 3 is inside the class-0 box but not selected
    same, other = cell_hits(points, sel, truth)
    assert same.tolist() == [[True, False, False, False]]
    assert other.tolist() == [[False, True, False, False]]


def test_per_class_selection_gives_each_class_its_count_by_its_own_score():
    # 1 image, 5 cells, 2 classes; class 1 scores below class 0 everywhere, as a rare class the teacher barely knows
    obj = [[0.9, 0.9, 0.9, 0.9, 0.9]]
    cls = [[[0.9, 0.05], [0.8, 0.1], [0.7, 0.3], [0.6, 0.2], [0.5, 0.01]]]
    raw = raw_outputs(obj, cls)
    assert select_cells(raw, 2.0).label[select_cells(raw, 2.0).selected].tolist() == [0, 0]  # by best score: no 1
    sel = select_cells(raw, torch.tensor([1.0, 1.0]))  # one cell per class
    assert sel.selected.tolist() == [[True, False, True, False, False]]
    assert sel.label[0, [0, 2]].tolist() == [0, 1]  # cell 2 is class 1's best (0.3), taught as class 1
    assert sel.score[0, 2] == pytest.approx(0.9 * 0.3, rel=1e-5)  # at its class-1 score
    both = select_cells(raw, torch.tensor([1.0, 3.0]))  # cells 2, 3, 1 for class 1; cell 0 for class 0
    assert both.selected.tolist() == [[True, True, True, True, False]]
    assert both.label[0, :4].tolist() == [0, 1, 1, 1]
    assert select_cells(raw, torch.tensor([0.4, 0.4])).selected.sum() == 0  # each count rounds to 0
    shared = select_cells(raw, torch.tensor([2.0, 3.0]))  # class 0: cells 0, 1; class 1: cells 2, 3, 1
    assert shared.selected.tolist() == [[True, True, True, True, False]]
    # cell 1 is chosen by both: taught as class 0, which scores it higher (0.8 against 0.1), at that score
    assert shared.label[0, :4].tolist() == [0, 0, 1, 1]
    assert shared.score[0, 1] == pytest.approx(0.9 * 0.8, rel=1e-5)


def test_per_class_selection_ranks_within_each_image():
    obj = [[0.9, 0.9, 0.9], [0.9, 0.9, 0.9]]
    cls = [[[0.9, 0.1], [0.2, 0.3], [0.1, 0.2]],  # image 0: class 1's best cell is cell 1
           [[0.1, 0.2], [0.2, 0.1], [0.9, 0.8]]]  # image 1: cell 2 is best for both classes
    sel = select_cells(raw_outputs(obj, cls), torch.tensor([1.0, 1.0]))
    assert sel.selected.tolist() == [[True, True, False], [False, False, True]]
    assert sel.label[0, :2].tolist() == [0, 1] and int(sel.label[1, 2]) == 0


def test_per_class_positives_count_each_classs_cells_per_image():
    assigned = torch.tensor([[-1, 0, 0, 1, -1], [2, -1, -1, -1, 0]])
    labels = torch.tensor([[0, 1, 0], [1, 0, 0]])  # image 0: boxes 0, 1 are classes 0, 1; image 1: box 0 class 1
    counts = positives_per_image(assigned, labels, 3)
    # image 0: two class-0 cells, one class-1 cell; image 1: a class-0 cell (box 2) and a class-1 cell (box 0)
    assert counts.tolist() == pytest.approx([1.5, 1.0, 0.0])
    assert float(counts.sum()) == pytest.approx(float(positives_per_image(assigned)))
