"""YOLO-style detector: assignment and decoding on hand-built cases, training behaviour, mosaic and EMA."""

from __future__ import annotations

import pytest
import torch

from detkit.data.mosaic import Mosaic
from detkit.lit.ema import ModelEMA
from detkit.models.backbones import Backbone
from detkit.models.detection.yolo import YOLO, CentreSamplingAssigner, cell_centres, decode_ltrb, encode_ltrb

SHAPES, STRIDES = [(40, 40), (20, 20), (10, 10)], [8, 16, 32]  # a 320 x 320 input


def grid():
    return cell_centres(SHAPES, STRIDES, torch.device("cpu"))


def test_cell_centres_hand_computed():
    points, strides, level = grid()
    assert level[1600 + 7].item() == 1 and level[-1].item() == 2
    assert points.shape == (1600 + 400 + 100, 2)
    assert points[5 * 40 + 7].tolist() == [60.0, 44.0] and strides[5 * 40 + 7] == 8  # row 5, col 7 at stride 8
    assert points[1600 + 2 * 20 + 3].tolist() == [56.0, 40.0] and strides[1600] == 16


def test_box_centred_in_a_known_cell_is_assigned_there_and_decodes_to_itself():
    points, strides, level = grid()
    box = torch.tensor([[[50.0, 34.0, 70.0, 54.0]]])  # 20 x 20, centred on (60, 44): row 5, col 7 at stride 8
    assigned = CentreSamplingAssigner(center_radius=2.5)(points, strides, level, box, torch.ones(1, 1, dtype=bool))
    positives = (assigned[0] >= 0).nonzero().flatten().tolist()
    centre = 5 * 40 + 7
    assert centre in positives and assigned[0, centre] == 0
    # exactly the 3 x 3 stride-8 cells whose centres lie inside the box; no coarser level (half-size 10 < 64)
    assert sorted(positives) == sorted(r * 40 + c for r in (4, 5, 6) for c in (6, 7, 8))
    raw = encode_ltrb(points[centre:centre + 1], strides[centre:centre + 1], box[0])
    decoded = decode_ltrb(points[centre:centre + 1], strides[centre:centre + 1], raw)
    torch.testing.assert_close(decoded, box[0], atol=1e-3, rtol=1e-4)


def test_large_box_goes_to_the_coarse_level_and_tiny_box_keeps_its_centre_cell():
    points, strides, level = grid()
    boxes = torch.tensor([[[10.0, 10.0, 310.0, 300.0], [100.5, 100.5, 102.0, 102.0]]])
    assigned = CentreSamplingAssigner()(points, strides, level, boxes, torch.ones(1, 2, dtype=bool))[0]
    assert set(level[assigned == 0].tolist()) == {2}  # half-size 150 >= 128: stride 32 only
    tiny = (assigned == 1).nonzero().flatten().tolist()
    assert tiny == [12 * 40 + 12]  # the stride-8 cell containing (101.25, 101.25), though no centre is inside


@pytest.mark.parametrize("size", [(320, 320), (256, 384), (640, 480)])
def test_every_box_of_any_size_anywhere_gets_a_positive_cell(size):
    """Tiny boxes whose centre cell lies on a level their size range excludes used to get no positive cell (the
    centre-cell fallback was decided before the range filter). One random box per image, 1 px to the image size."""
    h, w = size
    shapes = [(h // s, w // s) for s in STRIDES]
    points, strides, level = cell_centres(shapes, STRIDES, torch.device("cpu"))
    g = torch.Generator().manual_seed(h + w)
    n = 2000
    side = torch.exp(torch.rand(n, 2, generator=g) * torch.log(torch.tensor([w, h]) * 0.9)).clamp(min=1.0)
    side[: n // 2] = 1.0 + torch.rand(n // 2, 2, generator=g) * 8  # half of them 1-9 px
    x0y0 = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - side)
    boxes = torch.cat([x0y0, x0y0 + side], dim=1)[:, None]  # [n images, 1 box, 4]
    assigned = CentreSamplingAssigner()(points, strides, level, boxes, torch.ones(n, 1, dtype=torch.bool))
    missed = (~(assigned == 0).any(dim=1)).nonzero().flatten()
    assert len(missed) == 0, f"{len(missed)} boxes without a positive cell, e.g. {boxes[missed[:3], 0].tolist()}"


def test_overlapping_boxes_give_the_cell_to_the_smaller_and_padding_is_ignored():
    points, strides, level = grid()
    boxes = torch.tensor([[[40.0, 24.0, 80.0, 64.0], [50.0, 34.0, 70.0, 54.0], [0, 0, 0, 0]],
                          [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    assigned = CentreSamplingAssigner()(points, strides, level, boxes, valid)
    assert assigned[0, 5 * 40 + 7] == 1 and assigned[0, 3 * 40 + 5] == 0
    assert (assigned[1] == -1).all()


def small_yolo(num_classes: int = 2) -> YOLO:
    torch.manual_seed(0)
    return YOLO(Backbone(depth=18, neck="pan", neck_channels=32), num_classes)


def test_yolo_needs_a_multi_level_neck_and_one_size_range_per_level():
    with pytest.raises(ValueError, match="neck: pan"):
        YOLO(Backbone(depth=18, levels=["c5"], neck="none"), 2)
    with pytest.raises(ValueError, match="one range per level"):
        YOLO(Backbone(depth=18, levels=["c4", "c5"], neck="pan"), 2)
    with pytest.raises(ValueError, match="tile"):
        CentreSamplingAssigner(size_ranges=[[0, 64], [80, 1e8]])


def test_yolo_trains_on_empty_images_without_nan_and_learns():
    model = small_yolo().train()
    images = torch.full((2, 3, 128, 128), 30, dtype=torch.uint8)
    images[1, :, 40:90, 30:100] = 220
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.tensor([[30.0, 40.0, 100.0, 90.0]]), "labels": torch.tensor([1])}]
    losses = model.loss(images, targets)
    assert set(losses) == {"loss_box", "loss_obj", "loss_cls"}
    empty = model.loss(images[:1], targets[:1])
    assert empty["loss_box"] == 0 and empty["loss_cls"] == 0 and torch.isfinite(empty["loss_obj"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first = None
    for _ in range(15):
        loss = sum(model.loss(images, targets).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and loss.item() < 0.7 * first
    dets = model.eval().predict(images)
    assert (dets.boxes >= 0).all() and (dets.boxes <= 128).all()


class _Squares(torch.utils.data.Dataset):
    """Four 64x64 images, each with one white square box at a known place."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        image = torch.zeros(3, 64, 64, dtype=torch.uint8)
        image[:, 8:24, 16:48] = 255
        return image, {"boxes": torch.tensor([[16.0, 8.0, 48.0, 24.0]]), "labels": torch.tensor([i]), "image_id": i}


def test_mosaic_moves_boxes_with_their_tiles():
    torch.manual_seed(0)
    image, target = Mosaic(_Squares(), p=1.0)[0]
    assert image.shape == (3, 64, 64) and len(target["boxes"]) == 4 and target["labels"][0] == 0
    expected = torch.tensor([[8.0, 4.0, 24.0, 12.0], [40.0, 4.0, 56.0, 12.0], [8.0, 36.0, 24.0, 44.0],
                             [40.0, 36.0, 56.0, 44.0]])
    torch.testing.assert_close(target["boxes"], expected)
    for x0, y0, x1, y1 in expected.int().tolist():  # the pixels moved with the boxes
        assert image[0, y0 + 1:y1 - 1, x0 + 1:x1 - 1].min() > 200
    assert Mosaic(_Squares(), p=0.0)[2][1]["labels"].tolist() == [2]


def test_ema_follows_the_formula():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.5, ramp=1e-9)  # ramp ~0: d = 0.5 from the first update
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), 2.0))
    assert not ema.module.weight.requires_grad


class _Seeded(_Squares):
    """Like _Squares, but each item's pixels record the augmentation seed it was drawn with."""

    def __len__(self) -> int:
        return 2  # few images: a mosaic often draws the same image twice

    def item(self, i, seed):
        image, target = super().__getitem__(i)
        return torch.full_like(image, (seed or 0) % 251), target

    def __getitem__(self, i):
        return self.item(i, 1000 + i)  # what item_seed(i) gives in this "worker"


def test_mosaic_tiles_draw_their_own_augmentation(monkeypatch):
    """In a loader worker every tile gets its own seed: no tile repeats its image's own view of the epoch, and an
    image drawn twice into one mosaic gives two different tiles."""
    import detkit.data.mosaic as mosaic

    monkeypatch.setattr(mosaic, "item_seed", lambda i: 1000 + i)
    data = _Seeded()
    own_views = {int(data[i][0][0, 0, 0]) for i in range(len(data))}
    for index in range(len(data)):
        image, _ = mosaic.Mosaic(data, p=1.0)[index]
        tiles = [int(image[0, y, x]) for y, x in ((0, 0), (0, 63), (63, 0), (63, 63))]
        assert len(set(tiles)) == 4 and not own_views & set(tiles), tiles
