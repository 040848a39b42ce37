"""COCO dataset, transforms, collate, converters: boxes move with images, ids round-trip, nothing is lost."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detkit.cli.convert import main as convert_main
from detkit.data.coco import CocoDetection
from detkit.data.collate import detection_collate
from detkit.data.convert import voc_to_coco, yolo_to_coco
from detkit.data.transforms import DetectionTransform
from detkit.data.validate import validate_coco
from detkit.eval.coco_eval import detections_to_results, evaluate_coco
from detkit.lit.detection_module import to_original_pixels
from detkit.structures import Detections
from tests.helpers import BCCD, SHARED, dump, load, needs_shared


def test_ids_from_zero_round_trip_through_loading_and_evaluation(synthetic):
    """Category/image/annotation ids starting at 0: every annotation survives loading, and the ground truth fed
    back as predictions through the eval transform's inverse mapping scores AP = 1."""
    ann, root = synthetic
    data = load(ann)
    assert min(c["id"] for c in data["categories"]) == 0 and min(im["id"] for im in data["images"]) == 0
    ds = CocoDetection(ann, root, transform=DetectionTransform(size=160, train=False))
    assert sum(len(r.labels) for r in ds.records) == len(data["annotations"])
    _, targets = detection_collate([ds[i] for i in range(len(ds))])
    as_dets = Detections(targets.boxes, targets.valid.float(), targets.labels, targets.valid)
    boxes = to_original_pixels(as_dets, targets)
    results = []
    for i, image_id in enumerate(targets.image_ids.tolist()):
        keep = targets.valid[i]
        results += detections_to_results(boxes[i][keep], torch.ones(int(keep.sum())),
                                         ds.categories.ids_of(targets.labels[i][keep]), image_id)
    assert len(results) == len(data["annotations"])
    stats = evaluate_coco(data, results, backend="pycocotools").stats
    assert stats["AP"] == pytest.approx(1.0, abs=1e-6) and stats["AP50"] == pytest.approx(1.0)


def test_empty_images_are_kept_and_collate(synthetic):
    ann, root = synthetic
    ds = CocoDetection(ann, root, transform=DetectionTransform(size=128, train=True))
    empties = [i for i, r in enumerate(ds.records) if len(r.labels) == 0]
    assert empties, "fixture has empty images"
    items = [ds[i] for i in range(4)]
    images, targets = detection_collate(items)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 128, 128)
    # one padded tensor per field; an empty image has no valid row, the others keep every box in order
    most = max(len(t["boxes"]) for _, t in items)
    assert targets.boxes.shape == (4, max(8, -(-most // 8) * 8), 4) and targets.valid.sum(1).tolist() == \
        [len(t["boxes"]) for _, t in items]
    for i, (_, t) in enumerate(items):
        assert torch.equal(targets.image(i)["boxes"], t["boxes"]) and torch.equal(targets.image(i)["labels"],
                                                                                   t["labels"])
    assert targets.image_ids.tolist() == [t["image_id"] for _, t in items]
    assert targets.image(empties[0])["boxes"].shape == (0, 4)


def test_crowd_boxes_are_not_trained_but_stay_for_evaluation(synthetic, tmp_path):
    ann, root = synthetic
    data = load(ann)
    data["annotations"][0]["iscrowd"] = 1
    ds = CocoDetection(dump(data, tmp_path / "crowd.json"), root)
    assert sum(len(r.labels) for r in ds.records) == len(data["annotations"]) - 1
    assert any(a.get("iscrowd") for a in ds.coco_data["annotations"])


def test_non_contiguous_category_ids_map_to_labels_and_back(synthetic, tmp_path):
    ann, root = synthetic
    data = load(ann)
    remap = {0: 17, 1: 3, 2: 90}
    for c in data["categories"]:
        c["id"] = remap[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    ds = CocoDetection(dump(data, tmp_path / "ids.json"), root)
    assert ds.categories.ids == [3, 17, 90]
    assert ds.categories.ids_of(torch.tensor([0, 1, 2])).tolist() == [3, 17, 90]
    first = data["annotations"][0]
    rec = next(r for r in ds.records if r.image_id == first["image_id"])
    assert ds.categories.ids[rec.labels[0]] == first["category_id"]


def test_bccd_augmented_boxes_stay_inside_the_image_and_keep_their_labels():
    ds = CocoDetection(BCCD / "annotations" / "train.json", BCCD / "images",
                       transform=DetectionTransform(size=256, train=True, hflip=0.5, vflip=0.5))
    rng = np.random.default_rng(0)
    for i in rng.choice(len(ds), 12, replace=False):
        image, t = ds[int(i)]
        boxes, labels = t["boxes"], t["labels"]
        assert image.shape == (3, 256, 256)
        assert len(boxes) == len(labels) > 0
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 256).all() and (boxes[:, 3] <= 256).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert set(labels.tolist()) <= {0, 1, 2}


def test_flip_moves_box_with_the_image():
    image = np.zeros((50, 100, 3), np.uint8)
    image[10:20, 5:25] = 255  # a white box at x 5..25, y 10..20
    flip = DetectionTransform(size=100, train=True, hflip=1.0, vflip=0.0, scale_range=(1.0, 1.0),
                              color_jitter=0.0)
    out, boxes, labels, _ = flip(image, np.array([[5, 10, 25, 20]], np.float32), np.array([2]))
    np.testing.assert_allclose(boxes, [[75, 10, 95, 20]], atol=1e-4)
    assert labels.tolist() == [2]
    ys, xs = np.nonzero(out[..., 0] == 255)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (75, 95, 10, 20)


@needs_shared
def test_bccd_voc_converts_to_coco_and_loads(tmp_path):
    voc = SHARED / "bccd" / "BCCD"
    ids = (voc / "ImageSets" / "Main" / "val.txt").read_text().split()
    coco, problems = voc_to_coco(voc / "Annotations", voc / "JPEGImages", ids=ids)
    assert [c["name"] for c in coco["categories"]] == ["Platelets", "RBC", "WBC"]
    assert len(coco["images"]) == len(ids) and not problems
    n_objects = sum(len(__import__("xml.etree.ElementTree").etree.ElementTree.parse(
        voc / "Annotations" / f"{i}.xml").getroot().findall("object")) for i in ids)
    assert len(coco["annotations"]) == n_objects
    ann = dump(coco, tmp_path / "val.json")
    assert validate_coco(ann, voc / "JPEGImages").ok
    assert len(CocoDetection(ann, voc / "JPEGImages")) == len(ids)


@needs_shared
def test_convert_cli_reports_and_keeps_degenerate_voc_boxes(tmp_path, capsys):
    voc = SHARED / "bccd" / "BCCD"
    ids = tmp_path / "ids.txt"
    ids.write_text("BloodImage_00338\n")
    out = tmp_path / "one.json"
    assert convert_main(["voc", str(voc / "Annotations"), str(voc / "JPEGImages"), str(out), "--ids", str(ids),
                         "--classes", "Platelets,RBC,WBC"]) == 0
    data = json.loads(out.read_text())
    # xmin == xmax in VOC's inclusive 1-based pixels is a 1-pixel box: kept, with positive size
    assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in data["annotations"])
    assert (tmp_path / "one_categories.txt").read_text().splitlines()[0] == "1\tPlatelets"


def test_yolo_labels_convert_with_class_ids_from_zero(tmp_path):
    import cv2

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((100, 200, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "images" / "b.png"), np.zeros((100, 200, 3), np.uint8))
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.1 0.1\n7 0.5 0.5 0.1 0.1\n")
    coco, problems = yolo_to_coco(tmp_path / "labels", tmp_path / "images", ["cell", "blob"])
    assert [c["id"] for c in coco["categories"]] == [0, 1]
    assert len(coco["images"]) == 2  # b.png has no label file: an image without boxes
    assert coco["annotations"][0]["bbox"] == pytest.approx([80, 30, 40, 40])
    assert len(problems) == 1 and "class index 7" in problems[0] and "a.txt: line 3" in problems[0]
    ann = dump(coco, tmp_path / "yolo.json")
    assert validate_coco(ann, tmp_path / "images").ok


def test_epoch_shuffle_is_a_function_of_seed_and_epoch_alone():
    """The order and the loader generator's state depend on (seed, epoch) only, not on what was drawn before, so a
    run that starts at epoch 3 (a resume) sees what an uninterrupted run saw at epoch 3."""
    from detkit.data.shuffle import EpochShuffle

    def draw(epoch: int, warmup: int = 0) -> tuple[list[int], int]:
        g = torch.Generator()
        s = EpochShuffle(10, seed=7, generator=g)
        for e in range(warmup):  # epochs consumed before, as in an uninterrupted run
            s.set_epoch(e)
            list(s)
            torch.empty(()).random_(generator=g)  # the base seed a loader iterator draws
        s.set_epoch(epoch)
        return list(s), int(torch.empty((), dtype=torch.int64).random_(generator=g))

    order, base_seed = draw(3, warmup=3)
    assert sorted(order) == list(range(10))
    assert draw(3) == (order, base_seed)
    assert draw(4)[0] != order and draw(4)[1] != base_seed
    assert list(EpochShuffle(10, 8, torch.Generator(), epoch=3)) != order  # another seed, another order
