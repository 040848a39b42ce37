"""Priors against the data: anchor coverage, anchors fitted by IoU k-means, and the training size chosen from boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.data.box_stats import box_sizes, choose_image_size, letterboxed_boxes
from detkit.models.detection.anchor_fit import anchor_coverage, fit_anchors, grid_anchors, kmeans_iou
from detkit.models.detection.anchors import AnchorGenerator
from tests.helpers import RACCOON as RACCOON_DIR

RACCOON = RACCOON_DIR / "annotations.json"


def coco(boxes_per_image: list[list[list[float]]], size: tuple[int, int] = (320, 320)) -> dict:
    images = [{"id": i, "width": size[0], "height": size[1], "file_name": f"{i}.jpg"}
              for i in range(len(boxes_per_image))]
    anns = [{"id": 100 * i + j, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, boxes in enumerate(boxes_per_image) for j, b in enumerate(boxes)]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}


def test_coverage_of_boxes_equal_to_anchors_is_complete_and_of_odd_shapes_is_nil():
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [32.0, 32.0, 96.0, 96.0]])
    exact = anchor_coverage([np.array([[0.0, 0.0, 32.0, 32.0], [32.0, 32.0, 96.0, 96.0]])], anchors, 0.7)
    assert exact.bpr == 1.0 and exact.anchors_per_box == 1.0 and exact.num_boxes == 2
    thin = anchor_coverage([np.array([[0.0, 0.0, 4.0, 96.0]])], anchors, 0.7)  # best IoU 4*32/(32*32+...) < 0.7
    assert thin.bpr == 0.0 and thin.median_best_iou < 0.2


def test_kmeans_recovers_two_clusters_of_shapes_and_is_seeded():
    rng = np.random.default_rng(0)
    wh = np.concatenate([rng.normal([10, 20], 0.5, (50, 2)), rng.normal([80, 40], 1.0, (50, 2))])
    centres = kmeans_iou(wh, 2, seed=3)
    np.testing.assert_allclose(centres, [[10, 20], [80, 40]], atol=1.5)
    np.testing.assert_array_equal(centres, kmeans_iou(wh, 2, seed=3))


def test_letterboxed_boxes_scale_by_the_longer_side():
    data = coco([[[10, 20, 40, 30]]], size=(640, 480))
    np.testing.assert_allclose(letterboxed_boxes(data, 320)[0], [[5, 10, 25, 25]])
    np.testing.assert_allclose(box_sizes(data, 320), [[20, 15]])


def test_image_size_is_chosen_from_the_smallest_boxes_and_capped():
    assert choose_image_size(coco([[[0, 0, 100, 80]] * 5])) == 320  # ordinary objects: the CPU-friendly minimum
    tiny = coco([[[0, 0, 4, 4]] * 10], size=(2000, 2000))  # 4 px in 2000 -> 0.64 px at 320: needs 8/0.64 x 320
    assert choose_image_size(tiny) == 1024  # capped at MAX_SIZE
    small_native = coco([[[0, 0, 2, 2]] * 10], size=(500, 500))
    assert choose_image_size(small_native) == 512  # never above the median image side (rounded up to 32)


def test_fitted_anchors_cover_a_real_dataset_better_than_bccd_sized_ones():
    """On the raccoon photos (large animals, unlike BCCD's cells) the BCCD-sized anchors hardly reach IoU 0.7;
    anchors fitted to the boxes keep the generator's shape and cover almost all boxes."""
    data = json.loads(RACCOON.read_text())
    size, strides = 320, [8, 16, 32]
    boxes, wh = letterboxed_boxes(data, size), box_sizes(data, size)
    configured = AnchorGenerator([[16, 24], [48, 64], [96, 128]], [[0.5, 1.0, 2.0]] * 3)
    before = anchor_coverage(boxes, grid_anchors(configured, strides, size), 0.7)
    sizes, ratios = fit_anchors(wh, [2, 2, 2], [3, 3, 3], seed=0)
    assert [len(s) for s in sizes] == [2, 2, 2] and [len(r) for r in ratios] == [3, 3, 3]
    assert all(a <= b for a, b in zip(sum(sizes, []), sum(sizes, [])[1:]))  # finest level gets the smallest
    after = anchor_coverage(boxes, grid_anchors(AnchorGenerator(sizes, ratios), strides, size), 0.7)
    assert before.bpr < 0.5 and after.bpr >= 0.9, (before, after)
    assert fit_anchors(wh, [2, 2, 2], [3, 3, 3], seed=0) == (sizes, ratios)  # reproducible


def test_decide_anchors_applies_the_generators_fit_policy():
    """The policy lives beside the fitting (models side): never keeps (no fitted candidate), always replaces, auto
    replaces anchors that miss most boxes (or that the fit covers almost entirely, see the test below); the levels
    and per-level counts never change."""
    from detkit.models.detection.anchor_fit import decide_anchors

    data = json.loads(RACCOON.read_text())
    boxes, wh = letterboxed_boxes(data, 320), box_sizes(data, 320)
    sizes, ratios = [[16, 24], [48, 64], [96, 128]], [[0.5, 1.0, 2.0]] * 3
    never = decide_anchors(AnchorGenerator(sizes, ratios, fit="never"), boxes, wh, [8, 16, 32], 320)
    assert not never.fitted and never.candidate is None and never.sizes == sizes
    assert never.report(sizes, ratios)["fitted"] is None
    auto = decide_anchors(AnchorGenerator(sizes, ratios), boxes, wh, [8, 16, 32], 320)  # default: auto (the YAML's)
    assert auto.fitted and auto.candidate.bpr > auto.configured.bpr
    assert [len(s) for s in auto.sizes] == [2, 2, 2] and [len(r) for r in auto.aspect_ratios] == [3, 3, 3]
    covering = decide_anchors(AnchorGenerator(auto.sizes, auto.aspect_ratios), boxes, wh, [8, 16, 32], 320)
    assert not covering.fitted and covering.candidate is not None  # auto keeps anchors that already cover
    forced = decide_anchors(AnchorGenerator(auto.sizes, auto.aspect_ratios, fit="always"), boxes, wh, [8, 16, 32],
                            320)
    assert forced.fitted and forced.report(sizes, ratios)["fitted"]["coverage"]["bpr"] == forced.candidate.bpr


def test_anchor_fit_mode_is_checked():
    with pytest.raises(ValueError, match="anchor fit"):
        AnchorGenerator([[32]], [[1.0]], fit="sometimes")


#: BCCD-sized anchors over c3-c5 (the defaults before issue 34), which miss the raccoons.
SMALL_ANCHORS = ["model.detector.backbone.levels=[c3,c4,c5]",
                 "model.detector.rpn.anchor_generator.sizes=[[16,24],[48,64],[96,128]]",
                 "model.detector.rpn.anchor_generator.aspect_ratios=[[0.5,1.0,2.0],[0.5,1.0,2.0],[0.5,1.0,2.0]]"]


@pytest.mark.parametrize("dataset, size, anchors, refit", [("raccoon", 320, SMALL_ANCHORS, True),
                                                           ("raccoon", 320, [], True), ("bccd", 256, [], False),
                                                           ("bccd", 320, [], False)])
def test_fit_auto_refits_only_anchors_that_miss_most_boxes_or_where_fitting_covers_all(dataset, size, anchors,
                                                                                        refit):
    """fit=auto: BCCD-sized anchors (16-128 px) miss the raccoons (median best IoU 0.39 < 0.5) and are refitted;
    the default anchors (16-192 px over c2-c5) reach them (median 0.74) but only 64% at IoU 0.7, and the fitted
    ones cover all 33 (one class of large objects): refitted too. On BCCD at 256 px the default anchors cover 75%
    and the fitted ones 89% (many shapes; refitting there cost AP: STUDY.md): kept, as at 320 px (91%).
    ``always`` refits regardless."""
    from hydra import compose, initialize_config_dir

    from detkit.cli.train import fit_priors
    from detkit.paths import config_dir

    ann = RACCOON if dataset == "raccoon" else config_dir().parent / "data" / "bccd" / "annotations" / "train.json"
    data = json.loads(Path(ann).read_text())
    trained = []
    for mode, expected, seed in (("auto", refit, 0), ("auto", refit, 2), ("auto", refit, 12), ("always", True, 0)):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose("train", overrides=["data=coco", f"data.image_size={size}", *anchors, f"seed={seed}",
                                              f"model.detector.rpn.anchor_generator.fit={mode}"])
        configured = list(cfg.model.detector.rpn.anchor_generator.sizes)
        report = fit_priors(cfg, data)["anchors"]
        assert (report["fitted"] is not None) == expected, (mode, seed, report["coverage"])
        sizes = [list(s) for s in cfg.model.detector.rpn.anchor_generator.sizes]
        assert (sizes != [list(s) for s in configured]) == expected
        trained.append(sizes)
    # the anchors are a function of the data, not of the run's seed (a k-means start seeded by it refitted the
    # raccoons for most seeds but not for seeds 2 and 12: fitted recall 0.94 < 0.95)
    assert trained[0] == trained[1] == trained[2]
