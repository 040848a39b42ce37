"""Teacher-student self-training (semi=teacher): pseudo-label filtering and matching by hand, weak/strong views
with one geometry, the unlabeled stream, burn-in, the teacher as the student's EMA, short real runs of both
detectors, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from detkit.cli.train import train
from detkit.data.coco import CategoryMap, CategoryMismatchError
from detkit.data.shuffle import EpochStream
from detkit.data.synthetic import make_synthetic_coco
from detkit.data.weak_strong import UnlabeledBatch, UnlabeledPairs, WeakStrongViews, unlabeled_collate
from detkit.lit.detection_module import DetectionModule
from detkit.lit.semi import SelfTraining, SelfTrainingModule
from detkit.lit.semi import per_class_totals
from detkit.models.detection.pseudo_labels import (adaptive_thresholds, class_confidence, match_pseudo_labels,
                                                   on_other_class, per_class_counts, pseudo_label_targets,
                                                   score_thresholds)
from detkit.paths import config_dir
from detkit.structures import Detections, Targets
from tests.helpers import TINY, TINY_FRCNN, data_args

CATEGORIES = [{"id": i, "name": f"class{i}"} for i in range(3)]


def detections(scores, labels, boxes=None) -> Detections:
    scores = torch.tensor(scores, dtype=torch.float32)
    b, k = scores.shape
    if boxes is None:
        xy = torch.arange(b * k, dtype=torch.float32).view(b, k, 1) * 10
        boxes = torch.cat([xy, xy, xy + 5, xy + 5], -1)
    return Detections(torch.as_tensor(boxes, dtype=torch.float32), scores, torch.tensor(labels),
                      scores > 0)  # score 0: a padding slot


# ---- pseudo-labels -----------------------------------------------------------------------------------------------
def test_pseudo_labels_keep_confident_detections_top_k_padded_with_their_class():
    dets = detections([[0.95, 0.9, 0.8, 0.7, 0.3], [0.5, 0.0, 0.0, 0.0, 0.0]], [[2, 0, 1, 1, 0], [1, 0, 0, 0, 0]])
    out = pseudo_label_targets(dets, 0.7, max_labels=2)
    assert out.boxes.shape == (2, 2, 4) and out.labels.shape == out.valid.shape == (2, 2)
    assert out.valid.tolist() == [[True, True], [False, False]]  # top-2 of image 0 (3 above 0.7); none in image 1
    assert out.labels.tolist() == [[2, 0], [0, 0]]  # classes kept; padding rows are label 0 ...
    assert torch.equal(out.boxes[0], dets.boxes[0, :2]) and not out.boxes[1].any()  # ... and zero boxes
    wide = pseudo_label_targets(dets, 0.7, max_labels=8)  # more slots than detections: padded to the fixed size
    assert wide.valid.shape == (2, 8) and wide.valid.sum() == 3  # 0.7 itself is not above the threshold
    assert wide.labels[0, :3].tolist() == [2, 0, 1]
    per_class = pseudo_label_targets(dets, score_thresholds([0.2, 0.99, 0.85], 3), max_labels=8)
    assert per_class.valid.sum(1).tolist() == [3, 0]  # 0.95 (class 2 > 0.85), 0.9 and 0.3 (class 0 > 0.2);
    assert per_class.labels[0, :3].tolist() == [2, 0, 0]  # class 1 needs 0.99
    like = Targets.from_list([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "image_id": 7, "scale": 0.5},
                              {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "image_id": 9}])
    assert pseudo_label_targets(dets, 0.7, 2, like=like).image_ids.tolist() == [7, 9]
    with pytest.raises(ValueError, match="one per class"):
        score_thresholds([0.5, 0.5], 3)


def test_pseudo_labels_are_matched_class_aware_one_to_one_at_iou_half():
    box = [0.0, 0.0, 10.0, 10.0]
    truth = Targets.from_list([{"boxes": torch.tensor([box, [20.0, 20, 30, 30]]), "labels": torch.tensor([0, 1])}])
    pseudo = Targets.from_list([{"boxes": torch.tensor([box, [0.0, 0, 10, 9], [20.0, 20, 30, 30], [50.0, 50, 60, 60],
                                                        [0.0, 0, 10, 4]]),
                                 "labels": torch.tensor([0, 0, 0, 1, 0])}])
    tp = match_pseudo_labels(pseudo, truth, 0.5)
    # the first takes box 0; the second (IoU 0.9) finds it taken; the third has the wrong class; the fourth
    # overlaps nothing; the fifth (IoU 0.4) is too loose; padding rows never count
    assert tp[0].tolist() == [True, False, False, False, False, False, False, False]
    assert tp.sum() / pseudo.valid.sum() == pytest.approx(0.2)


def test_a_pseudo_label_on_another_classs_object_is_a_class_confusion_not_a_localisation_error():
    box, far = [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]
    truth = Targets.from_list([{"boxes": torch.tensor([box, [20.0, 20, 30, 30]]), "labels": torch.tensor([0, 1])},
                               {"boxes": torch.tensor([box]), "labels": torch.tensor([2])}])
    pseudo = Targets.from_list([
        {"boxes": torch.tensor([box, [20.0, 20, 30, 30], far, [0.0, 0, 10, 4]]), "labels": torch.tensor([1, 1, 0, 1])},
        {"boxes": torch.tensor([box, box]), "labels": torch.tensor([0, 2])}])
    other = on_other_class(pseudo, truth, 0.5)
    # image 0: class 1 on the class-0 box (a confusion); class 1 on its own box (no); on nothing (no); IoU 0.4 with
    # the class-0 box (too loose to say). Image 1: class 0 on the class-2 box (yes); class 2 on it (its own: no)
    assert other[:, :4].tolist() == [[True, False, False, False], [True, False, False, False]]
    assert not other[:, 4:].any()  # padding rows (from image 1's third slot on) are never confusions ...
    counts = per_class_counts(pseudo.labels, pseudo.valid, 3)  # ... and never count
    assert counts.tolist() == [2, 3, 1]
    assert per_class_counts(pseudo.labels, other, 3).tolist() == [1, 1, 0]
    assert per_class_counts(truth.labels, truth.valid, 3).tolist() == [1, 1, 1]


def test_the_runs_per_class_totals_sum_the_epochs_exactly():
    row = lambda name, n, t, o, g: {"name": name, "pseudo_labels": n, "true_positives": t, "on_other_class": o,
                                    "ground_truth_boxes": g}
    epochs = [{"per_class": [row("a", 3, 2, 1, 10), row("<b>", 0, 0, 0, 5)]},
              {"per_class": [row("a", 1, 1, 0, 10), row("<b>", 4, 1, 3, 5)]}]
    totals = per_class_totals(epochs)
    assert totals[0] == {**row("a", 4, 3, 1, 20), "precision": 0.75, "recall": 0.15, "other_class": 0.25}
    assert totals[1] == {**row("<b>", 4, 1, 3, 10), "precision": 0.25, "recall": 0.1, "other_class": 0.75}
    assert per_class_totals([{"per_class": [{"name": "a", "pseudo_labels": 2}]}]) == [
        {"name": "a", "pseudo_labels": 2}]  # without labels for the unlabeled images: counts only
    twins = [{"per_class": [{"name": "x", "pseudo_labels": 1, "threshold": 0.7},
                            {"name": "x", "pseudo_labels": 5, "threshold": 0.2}]},
             {"per_class": [{"name": "x", "pseudo_labels": 2, "threshold": 0.7},
                            {"name": "x", "pseudo_labels": 0, "threshold": 0.3}]}]
    assert per_class_totals(twins) == [  # two categories named alike stay apart (by class index) ...
        {"name": "x", "pseudo_labels": 3, "last_threshold": 0.7},
        {"name": "x", "pseudo_labels": 5, "last_threshold": 0.3}]  # ... with the adaptive threshold at the end


def test_an_epochs_record_counts_each_class_exactly():
    module = build("yolo", "semi.unlabeled_ann=unused.json")  # with labels: precision, recall and confusions
    a, b, far = [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [50.0, 50.0, 60.0, 60.0]
    truth = Targets.from_list([{"boxes": torch.tensor([a, b]), "labels": torch.tensor([0, 1])},
                               {"boxes": torch.tensor([a]), "labels": torch.tensor([2])}])
    pseudo = Targets.from_list([  # image 0: class 1 on the class-0 object, class 1 on its own, class 0 on nothing;
        {"boxes": torch.tensor([a, b, far]), "labels": torch.tensor([1, 1, 0])},  # image 1: class 2 right, then
        {"boxes": torch.tensor([a, a]), "labels": torch.tensor([2, 2])}])  # its duplicate (a false positive)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    module._record(pseudo, UnlabeledBatch(images, images, truth))
    module._record(pseudo, UnlabeledBatch(images, images, truth))  # a second step adds to the first
    module.flush_statistics()
    (record,) = module.history
    rows = {r["name"]: r for r in record["per_class"]}
    got = {n: (r["pseudo_labels"], r["true_positives"], r["on_other_class"], r["ground_truth_boxes"])
           for n, r in rows.items()}
    assert got == {"class0": (2, 0, 0, 2), "class1": (4, 2, 2, 2), "class2": (4, 2, 0, 2)}
    assert (record["unlabeled_images"], record["pseudo_labels"], record["ground_truth_boxes"]) == (4, 10, 6)
    assert record["precision"] == 0.4 and record["recall"] == round(4 / 6, 4) and record["other_class"] == 0.2
    assert rows["class1"]["other_class"] == 0.5 and rows["class0"]["precision"] == 0.0


def test_a_resumed_ddp_process_other_than_rank_0_does_not_restore_rank_0s_unfinished_counts():
    saved = {"self_training": {"history": [{"epoch": 0}], "images": 6, "epoch": 1, "stats": torch.ones(3, 4),
                               "confidence": torch.tensor([0.5, 0.2, 0.1])}}
    for rank, kept in ((0, True), (1, False)):
        module = build("yolo")
        module._trainer = SimpleNamespace(global_rank=rank, state=SimpleNamespace(fn="fit"))
        SelfTrainingModule.on_load_checkpoint(module, dict(saved))
        assert (module._stats is not None, module._stats_images) == ((True, 6) if kept else (False, 0))
        assert module.history == [{"epoch": 0}] and module._confidence.tolist() == pytest.approx([0.5, 0.2, 0.1])


# ---- the unlabeled views and their stream ------------------------------------------------------------------------
def known_image() -> tuple[np.ndarray, np.ndarray]:
    """A 100 x 200 dark image with one bright box at x 20-60, y 30-70."""
    image = np.full((100, 200, 3), 20, np.uint8)
    image[30:70, 20:60] = 230
    return image, np.array([[20.0, 30, 60, 70]], np.float32)


def test_weak_and_strong_views_share_their_geometry():
    image, box = known_image()
    views = WeakStrongViews(size=100, hflip=0.5, erasing=False, blur_p=0.0)
    flipped = 0
    for seed in range(16):
        weak, strong, boxes, labels, scale = views(image, box, np.array([1]), seed=seed)
        assert weak.shape == strong.shape == (3, 100, 100) and scale == 0.5 and labels.tolist() == [1]
        x0, y0, x1, y1 = boxes[0].round().astype(int)
        expect = [10, 15, 30, 35] if x0 == 10 else [70, 15, 90, 35]  # letterboxed, then flipped or not
        assert [x0, y0, x1, y1] == expect
        flipped += x0 == 70
        outside = torch.ones(50, 100, dtype=torch.bool)  # the image part of the canvas, less the box
        outside[y0:y1, x0:x1] = False
        for view in (weak, strong):  # the box lies on the bright object in both views; outside it, the background
            gray = view.float().mean(0)
            assert gray[y0 + 2: y1 - 2, x0 + 2: x1 - 2].mean() > 2 * gray[:50][outside].mean()
        assert (weak[:, 50:] == 114).all() and (strong[:, 50:] == 114).all()  # padding bottom, untouched
    assert 3 <= flipped <= 13
    assert not torch.equal(weak, strong)  # the strong view is photometrically changed


def test_strong_views_erase_rectangles_only_inside_the_image():
    image, box = known_image()
    views = WeakStrongViews(size=100, jitter_p=0.0, gray_p=0.0, blur_p=0.0, hflip=0.0)
    changed = 0
    for seed in range(8):
        weak, strong, *_ = views(image, box, np.array([0]), seed=seed)
        changed += int((weak != strong).any())
        assert torch.equal(weak[:, 50:], strong[:, 50:])  # erasing never moves or covers the padding
    assert changed >= 4  # erasing with p 0.7, 0.5, 0.3: most images lose a rectangle


def test_unlabeled_pairs_from_a_folder_and_from_labels(tmp_path):
    ann, root = make_synthetic_coco(tmp_path / "u", num_images=4, seed=1)
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG broken")
    views = WeakStrongViews(size=64)
    folder = UnlabeledPairs(root, views)
    assert len(folder) == 4 and folder.check.skipped  # the broken file is named and skipped
    batch = unlabeled_collate([folder[i] for i in range(2)])
    assert isinstance(batch, UnlabeledBatch) and batch.weak.shape == batch.strong.shape == (2, 3, 64, 64)
    assert batch.weak.dtype == torch.uint8 and not batch.targets.valid.any()
    labeled = UnlabeledPairs(root, views, ann_file=ann, categories=CategoryMap(CATEGORIES))
    data = json.loads(Path(ann).read_text())
    first = labeled[0][2]
    assert len(first["boxes"]) == sum(a["image_id"] == data["images"][0]["id"] for a in data["annotations"])
    with pytest.raises(CategoryMismatchError, match="differ"):
        UnlabeledPairs(root, views, ann_file=ann, categories=CategoryMap(CATEGORIES[:2]))


def test_the_unlabeled_stream_gives_a_fixed_count_per_epoch_and_visits_every_image():
    g = torch.Generator()
    stream = EpochStream(10, 4, seed=3, generator=g)
    epochs = []
    for epoch in range(5):
        stream.set_epoch(epoch)
        epochs.append(list(stream))
    assert all(len(e) == 4 == len(stream) for e in epochs)
    flat = sum(epochs, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # passes, no repeats
    again = EpochStream(10, 4, seed=3, generator=torch.Generator(), epoch=3)  # a resumed run draws the same
    assert list(again) == epochs[3]


# ---- the module --------------------------------------------------------------------------------------------------
def compose_semi(model: str, *overrides: str):
    fast = TINY_FRCNN if model == "faster_rcnn" else TINY
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("train", overrides=[f"model={model}", *fast, "semi=teacher", "semi.unlabeled_images=unused",
                                           "model.detector.backbone.neck_channels=32", "data.image_size=64",
                                           "paths.output_dir=/tmp/x", *overrides])


def build(model: str, *overrides: str) -> SelfTrainingModule:
    cfg = compose_semi(model, *overrides)
    torch.manual_seed(0)
    return instantiate(cfg.model, categories=CATEGORIES, _recursive_=False,
                       _target_="detkit.lit.semi.SelfTrainingModule", semi=cfg.semi)


def semi_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    targets = Targets.from_list([{"boxes": torch.tensor([[5.0, 5, 30, 40]]), "labels": torch.tensor([1])},
                                 {"boxes": torch.tensor([[20.0, 10, 60, 50]]), "labels": torch.tensor([2])}])
    return {"labeled": (images, targets), "unlabeled": UnlabeledBatch(images.flip(-1), images.flip(-1), targets)}


def test_burn_in_trains_on_labels_only_then_adds_the_unsupervised_terms():
    before = build("faster_rcnn", "semi.burn_in=1")  # global step 0 < 1: burn-in
    losses, _ = before.training_losses(semi_batch())
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    after = build("faster_rcnn", "semi.burn_in=0", "semi.score_threshold=0.0")
    losses, _ = after.training_losses(semi_batch())
    assert {k for k in losses if k.startswith("unsup_")} == {"unsup_loss_objectness", "unsup_loss_classifier"}
    regress = build("faster_rcnn", "semi.burn_in=0", "semi.unsup_losses=[loss_objectness,loss_box_reg]")
    assert "unsup_loss_box_reg" in regress.training_losses(semi_batch())[0]
    yolo = build("yolo", "semi.burn_in=0")
    assert {k for k in yolo.training_losses(semi_batch())[0] if k.startswith("unsup_")} == \
        {"unsup_loss_cls", "unsup_loss_box"}
    with pytest.raises(Exception, match="unsup_losses"):  # (wrapped by Hydra; detkit-train shows it alone)
        build("yolo", "semi.unsup_losses=[loss_classifier]")


def test_the_unsupervised_weight_is_1_by_default_and_scales_every_unsupervised_term():
    low = ["model.detector.inference.score_thresh=0.0"]  # (YOLO's untrained scores, ~1e-4, are below its default)
    for model, terms in (("faster_rcnn", ("unsup_loss_objectness", "unsup_loss_classifier")),
                         ("yolo", ("unsup_loss_cls", "unsup_loss_box"))):
        extra = [*low] if model == "yolo" else []
        default = build(model, "semi.burn_in=0", "semi.score_threshold=0.0", *extra)
        four = build(model, "semi.burn_in=0", "semi.score_threshold=0.0", "semi.unsup_weight=4", *extra)
        assert default.unsup_weight == 1.0 and default.summary()["unsup_weight"] == 1.0
        a, b = default.training_losses(semi_batch())[0], four.training_losses(semi_batch())[0]  # same seed, weights
        for k in terms:
            assert float(a[k].detach()) > 0 and float(b[k].detach()) == pytest.approx(4 * float(a[k].detach()))
    with pytest.raises(Exception, match="unsup_weight"):
        build("yolo", "semi.unsup_weight=-1")


def test_the_teacher_is_the_students_ema_and_receives_no_gradient():
    module = build("faster_rcnn", "semi.burn_in=1", "semi.teacher_decay=0.9", "semi.score_threshold=0.0")
    teacher, student = module.ema.module, module.detector
    assert module.inference_model is teacher and module.hparams.ema_decay == 0.9
    opt = torch.optim.SGD(student.parameters(), lr=0.1)

    def step(n: int) -> None:
        module._burn_in = 0 if n else 1  # the second step is past burn-in
        losses, _ = module.training_losses(semi_batch())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        module._burn_in = 1
        module.update_teacher(n)

    step(0)  # burn-in: the teacher copies the student exactly
    assert all(torch.equal(t, s) for t, s in zip(teacher.state_dict().values(), student.state_dict().values()))
    old = {k: v.clone() for k, v in teacher.state_dict().items()}
    step(1)  # after: teacher = 0.9 teacher + 0.1 student
    name = "roi_heads.box_predictor.cls_score.weight"
    expect = 0.9 * old[name] + 0.1 * student.state_dict()[name]
    assert torch.allclose(teacher.state_dict()[name], expect, atol=1e-7)
    assert not torch.equal(teacher.state_dict()[name], student.state_dict()[name])
    assert not teacher.training


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown semi settings"):
        SelfTraining.from_config({"unlabeled_images": "x", "burn_inn": 3})
    with pytest.raises(ValueError, match="teacher_decay"):
        SelfTraining(unlabeled_images="x", teacher_decay=1.0)


def test_dense_pseudo_labels_teach_every_yolo_term_at_as_many_cells_as_the_labeled_images_positives():
    module = build("yolo", "semi.burn_in=0", "semi.pseudo_labels=dense", "semi.unlabeled_ann=unused.json")
    batch = semi_batch()
    losses, _ = module.training_losses(batch)
    assert {k for k in losses if k.startswith("unsup_")} == {"unsup_loss_box", "unsup_loss_obj", "unsup_loss_cls"}
    assert all(torch.isfinite(v) for v in losses.values())
    images, targets = batch["labeled"]
    det = module.detector
    with torch.no_grad():
        _, grid = det.forward_raw(images)
    positives = (det.assigner(grid.points, grid.strides, grid.level, targets.boxes, targets.valid) >= 0).sum(1)
    per_image = round(float(positives.float().mean()))
    assert per_image > 0 and int(module._stats[:, 0].sum()) == 2 * per_image  # both unlabeled images
    module.flush_statistics()
    (record,) = module.history
    assert record["unit"] == "cells" and record["recall"] is None and record["pseudo_labels"] == 2 * per_image
    summary = module.summary()
    assert summary["unit"] == "cells" and summary["score_threshold"] is summary["precision_iou"] is None
    boxes = build("yolo", "semi.burn_in=0", "semi.score_threshold=0.0", "model.detector.inference.score_thresh=0.0")
    assert boxes.summary()["unit"] == "boxes"


def test_per_class_dense_pseudo_labels_give_each_class_the_labeled_images_share():
    module = build("yolo", "semi.burn_in=0", "semi.pseudo_labels=dense", "semi.dense_per_class=true")
    batch = semi_batch()
    u = batch["unlabeled"]
    other = Targets(u.targets.boxes, torch.zeros_like(u.targets.labels), u.targets.valid, u.targets.image_ids,
                    u.targets.orig_sizes, u.targets.scales)  # the unlabeled images' own labels (class 0) never count
    batch["unlabeled"] = UnlabeledBatch(u.weak, u.strong, other)
    module.training_losses(batch)
    images, targets = batch["labeled"]
    det = module.detector
    with torch.no_grad():
        _, grid = det.forward_raw(images)
    assigned = det.assigner(grid.points, grid.strides, grid.level, targets.boxes, targets.valid)
    cell_labels = targets.labels.gather(1, assigned.clamp(min=0))
    per_class = [round(float(((assigned >= 0) & (cell_labels == c)).sum()) / 2) for c in range(3)]
    assert per_class[0] == 0 and per_class[1] > 0 and per_class[2] > 0  # the labeled batch holds classes 1 and 2
    # each class's top cells by its own score, at its count on both unlabeled images; a cell picked by two classes
    # is one cell, labelled by the class that scores it higher: so at most the count per class, at least the largest
    got = module._stats[:, 0].tolist()
    assert got[0] == 0  # no class-0 cell in the labeled batch: none selected (class-agnostic ranking selects some)
    assert all(0 < got[c] <= 2 * per_class[c] for c in (1, 2)) and sum(got) >= 2 * max(per_class)
    agnostic = build("yolo", "semi.burn_in=0", "semi.pseudo_labels=dense")
    agnostic.training_losses(batch)
    assert int(agnostic._stats[0, 0]) > 0  # the same teacher ranking any class: the guard above can fail
    # the counts are a moving average seeded by the first step, and a class once seen keeps at least one cell
    assert module._cell_counts.tolist() == pytest.approx(per_class, abs=0.5)
    images, targets = batch["labeled"]
    only_2 = Targets(targets.boxes, targets.labels, targets.labels == 2, targets.image_ids, targets.orig_sizes,
                     targets.scales)  # a batch without class 1: its count decays by 0.9, it is not dropped
    first = module._cell_counts.clone()
    counts = module.class_cell_counts(torch.tensor([0.0, 0.0, float(first[2])]))
    assert float(module._cell_counts[1]) == pytest.approx(0.9 * float(first[1]))
    assert float(counts[1]) >= 1.0 and float(counts[0]) == 0.0
    module.training_losses({"labeled": (images, only_2), "unlabeled": batch["unlabeled"]})
    assert float(module._cell_counts[1]) == pytest.approx(0.81 * float(first[1]))
    assert module.summary()["dense_per_class"] is True
    with pytest.raises(ValueError, match="dense_per_class"):
        SelfTraining(unlabeled_images="x", dense_per_class=True)


def test_dense_pseudo_labels_come_from_the_teacher_not_the_student():
    module = build("yolo", "semi.burn_in=0", "semi.pseudo_labels=dense", "semi.unlabeled_ann=unused.json")
    batch = semi_batch()
    module.training_losses(batch)
    before = module._stats.clone()
    assert int(before[1:, 0].sum()) > 0  # the untrained teacher's selected cells are of several classes
    module._stats = None
    with torch.no_grad():  # the teacher (not the student) now scores every cell as class 0
        head = module.ema.module.head
        for obj, cls in zip(head.obj_pred, head.cls_pred):
            obj.bias.fill_(10.0)
            cls.bias.copy_(torch.tensor([10.0, -10.0, -10.0]))
            obj.weight.zero_()
            cls.weight.zero_()
    module.training_losses(batch)
    assert int(module._stats[0, 0]) == int(before[:, 0].sum())  # the same count, every selected cell now class 0
    assert int(module._stats[1:, 0].sum()) == 0


@pytest.mark.parametrize("per_class", [False, True])
def test_a_labeled_batch_without_objects_switches_the_dense_terms_off_for_that_step(per_class):
    module = build("yolo", "semi.burn_in=0", "semi.pseudo_labels=dense", f"semi.dense_per_class={per_class}")
    batch = semi_batch()
    images, targets = batch["labeled"]
    empty = Targets(targets.boxes, targets.labels, torch.zeros_like(targets.valid), targets.image_ids,
                    targets.orig_sizes, targets.scales)
    losses, _ = module.training_losses({"labeled": (images, empty), "unlabeled": batch["unlabeled"]})
    assert all(float(losses[f"unsup_{k}"].detach()) == 0.0 for k in ("loss_box", "loss_obj", "loss_cls"))
    assert int(module._stats[:, 0].sum()) == 0


def test_dense_pseudo_labels_need_labeled_and_unlabeled_images_of_one_size():
    module = build("yolo", "semi.burn_in=0", "semi.pseudo_labels=dense")
    batch = semi_batch()
    images, targets = batch["labeled"]
    with pytest.raises(ValueError, match="one size"):
        module.training_losses({"labeled": (images[..., :32], targets), "unlabeled": batch["unlabeled"]})


def test_dense_pseudo_labels_are_refused_where_they_cannot_work():
    with pytest.raises(Exception, match="model=yolo"):
        build("faster_rcnn", "semi.pseudo_labels=dense")
    with pytest.raises(Exception, match="adaptive"):
        build("yolo", "semi.pseudo_labels=dense", "semi.adaptive_threshold=true")
    with pytest.raises(ValueError, match="pseudo_labels"):
        SelfTraining(unlabeled_images="x", pseudo_labels="soft")


def test_soft_background_weights_come_from_the_teacher_on_the_weak_views():
    """semi.soft_background=true (Faster R-CNN): the student's unsupervised RoI loss gets, for its sampled RoIs, the
    teacher's background probability computed on the weak views' features (not the strong views', not the
    student's); the labeled batch's loss gets no weights."""
    module = build("faster_rcnn", "semi.burn_in=0", "semi.score_threshold=0.0", "semi.soft_background=true")
    student, teacher = module.detector, module.teacher()
    with torch.no_grad():  # the teacher now differs from the student (the EMA starts as its copy), head and features
        teacher.roi_heads.box_predictor.cls_score.bias[-1] -= 3.0
        teacher.roi_heads.box_predictor.cls_score.weight.mul_(20.0)
        teacher.roi_heads.box_head.fc6.weight.mul_(1.5)
    batch = semi_batch()
    weak = batch["unlabeled"].weak
    strong = (weak.float() * 0.5 + 60).to(torch.uint8)  # a photometric change: same geometry, other pixels
    batch["unlabeled"] = UnlabeledBatch(weak, strong, batch["unlabeled"].targets)
    calls, original = [], student.roi_heads.loss

    def spy(features, proposals, targets, generator=None, background_weights=None):
        if background_weights is None:
            calls.append(None)
            return original(features, proposals, targets, generator)

        def recorded(boxes):
            weights = background_weights(boxes)
            calls.append((boxes, weights))
            return weights
        return original(features, proposals, targets, generator, recorded)

    student.roi_heads.loss = spy
    losses, _ = module.training_losses(batch)
    assert calls[0] is None and len(calls) == 2  # the labeled loss is plain; the unlabeled one weighted once
    boxes, weights = calls[1]
    assert boxes.shape[:2] == weights.shape == (2, student.roi_heads.sampler.batch_size_per_image)
    with torch.no_grad():
        expect = teacher.roi_heads.background_probability(teacher.predict_with_features(weak)[1], boxes)
        on_strong = teacher.roi_heads.background_probability(teacher.predict_with_features(strong)[1], boxes)
        from_student = student.roi_heads.background_probability(student.predict_with_features(weak)[1], boxes)
        student_features = teacher.roi_heads.background_probability(student.predict_with_features(weak)[1], boxes)
    assert torch.allclose(weights, expect, atol=1e-6)
    for wrong in (on_strong, from_student, student_features):  # the strong view; the student; the student's features
        assert not torch.allclose(weights, wrong, atol=1e-3)
    plain = build("faster_rcnn", "semi.burn_in=0", "semi.score_threshold=0.0")
    with torch.no_grad():
        for p, q in zip(plain.ema.module.parameters(), teacher.parameters()):
            p.copy_(q)
    plain_losses, _ = plain.training_losses(batch)  # same seed, same teacher: only the weights differ
    assert float(losses["unsup_loss_classifier"].detach()) != pytest.approx(
        float(plain_losses["unsup_loss_classifier"].detach()), rel=1e-3)
    assert float(losses["unsup_loss_objectness"].detach()) == pytest.approx(
        float(plain_losses["unsup_loss_objectness"].detach()), rel=1e-6)
    assert module.summary()["soft_background"] is True and plain.summary()["soft_background"] is False


def test_soft_background_is_refused_where_it_cannot_work():
    with pytest.raises(Exception, match="model=faster_rcnn"):
        build("yolo", "semi.soft_background=true")
    with pytest.raises(Exception, match="loss_classifier"):
        build("faster_rcnn", "semi.soft_background=true", "semi.unsup_losses=[loss_objectness]")
    with pytest.raises(ValueError, match="soft_background"):
        SelfTraining(unlabeled_images="x", pseudo_labels="dense", soft_background=True)


# ---- real runs ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def semi_data(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("semi")
    ann, root = make_synthetic_coco(tmp / "labeled", num_images=8, seed=3)
    uann, uroot = make_synthetic_coco(tmp / "unlabeled", num_images=10, seed=4)
    return {"ann": ann, "root": root, "uann": uann, "uroot": uroot}


def run_semi(model: str, data: dict, out: Path, *overrides: str) -> dict:
    cfg = compose_semi(model, *data_args(data["ann"], data["root"]), f"semi.unlabeled_images={data['uroot']}",
                       f"semi.unlabeled_ann={data['uann']}", "data.batch_size=2", "trainer.max_epochs=2",
                       "trainer.check_val_every_n_epoch=2", "trainer.log_every_n_steps=1", "report=false",
                       f"paths.output_dir={out}", *overrides)  # (a later report=true wins)
    return train(cfg, out)


def check_records(metrics: dict, out: Path, model: str, burn_in: int) -> None:
    """Two epochs of 4 steps of 2 images: epoch 0 self-trains after burn-in, epoch 1 throughout; nothing
    unsupervised is logged before burn-in ends, and the checkpoint loads as a plain detector's."""
    st = metrics["self_training"]
    assert st["burn_in_steps"] == burn_in and st["precision_iou"] == 0.5
    assert [e["epoch"] for e in st["epochs"]] == [0, 1]
    assert [e["unlabeled_images"] for e in st["epochs"]] == [2 * (4 - burn_in), 8]
    assert st["epochs"][1]["pseudo_labels"] > 0
    assert all(set(e) >= {"pseudo_labels", "pseudo_labels_per_image", "precision", "recall", "other_class"}
               for e in st["epochs"])
    for e in st["epochs"]:  # per class, summing to the epoch's totals
        assert [r["name"] for r in e["per_class"]] == [c["name"] for c in CATEGORIES]
        assert sum(r["pseudo_labels"] for r in e["per_class"]) == e["pseudo_labels"]
        assert sum(r["ground_truth_boxes"] for r in e["per_class"]) == e["ground_truth_boxes"]
        tp = sum(r["true_positives"] for r in e["per_class"])
        assert e["precision"] == (round(tp / e["pseudo_labels"], 4) if e["pseudo_labels"] else None)
    assert [r["pseudo_labels"] for r in st["per_class"]] == [
        sum(e["per_class"][k]["pseudo_labels"] for e in st["epochs"]) for k in range(len(CATEGORIES))]
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    unsup = "train/unsup_loss_classifier" if model == "faster_rcnn" else "train/unsup_loss_cls"
    steps = {int(r["step"]) for r in rows if r.get(unsup)}
    assert steps and min(steps) == burn_in  # nothing unsupervised during burn-in, present after
    assert any(r.get("semi/pseudo_labels_per_image") for r in rows)
    inference = DetectionModule.from_checkpoint(out / "checkpoints" / "last.ckpt")  # a plain checkpoint: the teacher
    assert inference.ema is not None


def test_a_short_yolo_self_training_run_records_its_pseudo_labels(semi_data, tmp_path):
    # threshold 0: the barely trained teacher's detections are pseudo-labels (YOLO's scores start near 1e-4,
    # sigmoid priors of 0.01 for objectness and class, below even its inference threshold)
    metrics = run_semi("yolo", semi_data, tmp_path, "semi.burn_in=2", "semi.score_threshold=0.0",
                       "model.detector.inference.score_thresh=0.0", "report=true")
    check_records(metrics, tmp_path, "yolo", 2)
    page = (tmp_path / "report.html").read_text()  # the results browser shows the same records
    assert "Self-training: pseudo-labels per epoch" in page and "burn-in 2 steps" in page


def test_a_short_yolo_run_with_dense_pseudo_labels_records_cells(semi_data, tmp_path):
    metrics = run_semi("yolo", semi_data, tmp_path, "semi.burn_in=2", "semi.pseudo_labels=dense", "report=true")
    page = (tmp_path / "report.html").read_text()
    assert "dense pseudo-labels" in page and "pseudo-labels above" not in page
    st = metrics["self_training"]
    assert st["pseudo_labels"] == "dense" and st["unit"] == "cells"
    assert [e["unlabeled_images"] for e in st["epochs"]] == [4, 8]
    assert all(e["pseudo_labels"] > 0 and e["unit"] == "cells" and e["recall"] is None for e in st["epochs"])
    assert all(r["recall"] is None for r in st["per_class"])
    rows = list(csv.DictReader((tmp_path / "logs" / "metrics.csv").open()))
    steps = {int(r["step"]) for r in rows if r.get("train/unsup_loss_obj")}
    assert steps and min(steps) == 2
    assert DetectionModule.from_checkpoint(tmp_path / "checkpoints" / "last.ckpt").ema is not None


def test_a_resumed_self_training_run_equals_an_uninterrupted_one(semi_data, tmp_path):
    """Faster R-CNN, burn-in 1 step, a checkpoint at step 2 (mid-epoch, teacher already moving by its EMA) resumed
    in a new run: the same weights, teacher and pseudo-label records as the run that went on (both loaders'
    positions and seeds restored; the teacher's update is in the checkpoint of its step)."""
    every = ["+callbacks.steps._target_=lightning.pytorch.callbacks.ModelCheckpoint",
             f"+callbacks.steps.dirpath={tmp_path / 'steps'}", "+callbacks.steps.every_n_train_steps=2",
             "+callbacks.steps.save_top_k=1", "+callbacks.steps.monitor=step", "+callbacks.steps.mode=min",
             "+callbacks.steps.filename='s{step}'", "data.num_workers=1",
             "semi.burn_in=1", "semi.score_threshold=0.05",  # 0.05: the barely trained teacher's detections count
             "semi.adaptive_threshold=true", "semi.adaptive_floor=0.0"]  # its class levels must resume too
    full = run_semi("faster_rcnn", semi_data, tmp_path / "full", *every)
    check_records(full, tmp_path / "full", "faster_rcnn", 1)
    (saved,) = (tmp_path / "steps").glob("*step=2.ckpt")
    ckpt = tmp_path / "step2.ckpt"  # ('=' in a path does not parse as an override value)
    ckpt.write_bytes(saved.read_bytes())
    resumed = run_semi("faster_rcnn", semi_data, tmp_path / "resumed", *every, f"ckpt_path={ckpt}")
    a = torch.load(tmp_path / "full/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("ema.module.") for k in a["state_dict"])  # the teacher is in the checkpoint
    same = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y  # noqa: E731 (EMA counter)
    different = [k for k in a["state_dict"] if not same(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different[:5]
    assert full["self_training"] == resumed["self_training"]
    assert all("threshold" in r for r in full["self_training"]["epochs"][-1]["per_class"])
    assert torch.equal(a["self_training"]["confidence"], b["self_training"]["confidence"])  # the class levels
    assert full["AP"] == resumed["AP"]


def test_a_resumed_dense_self_training_run_equals_an_uninterrupted_one(semi_data, tmp_path):
    """YOLO with dense pseudo-labels selected per class, checkpoint at step 3 (mid-epoch, after burn-in) resumed in a new run: the same
    weights, teacher and cell records as the run that went on."""
    every = ["+callbacks.steps._target_=lightning.pytorch.callbacks.ModelCheckpoint",
             f"+callbacks.steps.dirpath={tmp_path / 'steps'}", "+callbacks.steps.every_n_train_steps=3",
             "+callbacks.steps.save_top_k=1", "+callbacks.steps.monitor=step", "+callbacks.steps.mode=min",
             "+callbacks.steps.filename='s{step}'", "data.num_workers=1", "semi.burn_in=2",
             "semi.pseudo_labels=dense", "semi.dense_per_class=true"]  # its class counts must resume too
    full = run_semi("yolo", semi_data, tmp_path / "full", *every)
    (saved,) = (tmp_path / "steps").glob("*step=3.ckpt")
    ckpt = tmp_path / "step3.ckpt"
    ckpt.write_bytes(saved.read_bytes())
    resumed = run_semi("yolo", semi_data, tmp_path / "resumed", *every, f"ckpt_path={ckpt}")
    a = torch.load(tmp_path / "full/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    same = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y  # noqa: E731
    different = [k for k in a["state_dict"] if not same(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different[:5]
    assert full["self_training"] == resumed["self_training"] and full["self_training"]["unit"] == "cells"
    assert full["self_training"]["epochs"][0]["pseudo_labels"] > 0
    assert torch.equal(a["self_training"]["cell_counts"], b["self_training"]["cell_counts"])
    assert full["AP"] == resumed["AP"]


@pytest.mark.slow
def test_self_training_under_two_process_ddp_sums_its_records_over_processes(semi_data, tmp_path):
    """``trainer=ddp`` on 2 CPU processes (gloo; Lightning's launcher re-runs the command per rank): each process
    gets half the labeled batches and as many unlabeled ones, and the per-epoch records are summed over both.
    8 labeled images, batch 2: 2 steps per process and epoch; burn-in 1 step."""
    from tests.helpers import run

    r = run(["detkit-train", *data_args(semi_data["ann"], semi_data["root"]), *TINY_FRCNN, "data.image_size=64",
             "data.batch_size=2", "trainer.max_epochs=2", "trainer=ddp_cpu", "trainer.strategy=ddp", "semi=teacher",
             f"semi.unlabeled_images={semi_data['uroot']}", f"semi.unlabeled_ann={semi_data['uann']}",
             "semi.burn_in=1", "semi.score_threshold=0.05", "report=false", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    # epoch 0: step 1 self-trains on 2 processes x 2 images; epoch 1: 2 steps x 2 processes x 2 images
    assert [e["unlabeled_images"] for e in metrics["self_training"]["epochs"]] == [4, 8]


# ---- adaptive class-wise thresholds ------------------------------------------------------------------------------
def test_adaptive_thresholds_scale_with_each_classs_confidence_and_stop_at_the_floor():
    # image 0: class 0 best 0.9, class 1 best 0.3 (its 0.2 is not its best), no class 2; image 1: class 0 best 0.7,
    # class 1 best 0.1; the padding slot (score 0.95, invalid) must not count
    dets = Detections(torch.zeros(2, 3, 4), torch.tensor([[0.9, 0.3, 0.2], [0.7, 0.1, 0.95]]),
                      torch.tensor([[0, 1, 1], [0, 1, 2]]), torch.tensor([[True, True, True], [True, True, False]]))
    conf = class_confidence(dets, 3)
    assert conf.tolist() == pytest.approx([0.8, 0.2, 0.0])
    thresholds = adaptive_thresholds(conf, 0.7, floor=0.1)
    assert thresholds.tolist() == pytest.approx([0.7, 0.175, 0.1])  # 0.7 * 0.2 / 0.8; class 2 at the floor
    # the pseudo-labels they give: image 0 keeps all three (class 1's 0.3 and 0.2 are above 0.175); image 1 none
    # (0.7 is not above class 0's 0.7, 0.1 is below class 1's 0.175)
    kept = pseudo_label_targets(dets, thresholds, 4)
    assert kept.valid.sum(1).tolist() == [3, 0]
    assert adaptive_thresholds(torch.zeros(3), 0.7, 0.1).tolist() == pytest.approx([0.1] * 3)  # nothing seen yet


def test_the_adaptive_class_levels_are_a_moving_average_seeded_by_the_first_batch():
    module = SimpleNamespace(settings=SelfTraining(unlabeled_images="x", adaptive_threshold=True, adaptive_decay=0.75),
                             categories=[0, 1], _confidence=None, _trainer=None)
    module.class_thresholds = lambda: SelfTrainingModule.class_thresholds(module)
    one = Detections(torch.zeros(1, 2, 4), torch.tensor([[0.8, 0.4]]), torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool))
    two = Detections(torch.zeros(1, 2, 4), torch.tensor([[0.8, 0.0]]), torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool))
    assert SelfTrainingModule.adapt_thresholds(module, one).tolist() == pytest.approx([0.7, 0.35])
    # the levels move a quarter of the way: class 1's from 0.4 to 0.75 * 0.4 + 0.25 * 0 = 0.3 (of class 0's 0.8)
    assert SelfTrainingModule.adapt_thresholds(module, two).tolist() == pytest.approx([0.7, 0.2625])
    with pytest.raises(ValueError, match="one value"):
        SelfTraining(unlabeled_images="x", adaptive_threshold=True, score_threshold=[0.5, 0.6])
    ddp = SimpleNamespace(settings=module.settings, categories=[0, 1], _confidence=None,
                          _trainer=SimpleNamespace(world_size=2))
    ddp.trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(
        reduce=lambda t, reduce_op: torch.tensor([0.6, 0.15]) if reduce_op == "mean" else None))
    ddp.class_thresholds = lambda: SelfTrainingModule.class_thresholds(ddp)
    # under DDP the level is the processes' mean (here 0.6 / 0.15), not this process's own (0.8 / 0.4)
    assert SelfTrainingModule.adapt_thresholds(ddp, one).tolist() == pytest.approx([0.7, 0.175])
    assert ddp._confidence.tolist() == pytest.approx([0.6, 0.15])
    with pytest.raises(ValueError, match="must be a number"):
        SelfTraining(unlabeled_images="x", unsup_weight=None)
    with pytest.raises(ValueError, match="above semi.score_threshold"):  # the floor would switch adaptation off
        SelfTraining(unlabeled_images="x", adaptive_threshold=True, score_threshold=0.05, adaptive_floor=0.1)
