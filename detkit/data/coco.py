"""COCO-format detection dataset.

This module is the one place where COCO ``xywh`` boxes become detkit's ``xyxy`` absolute-pixel boxes, and where
arbitrary COCO category ids (0 included) become contiguous labels ``0..C-1``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from detkit.data.image_files import read_rgb  # noqa: F401  (the reading policy; also imported from here)
from detkit.data.transforms import item_seed
from detkit.data.validate import DatasetError, drop_invalid, group_by_image, load_coco_json, resolve_image_path, validate_coco
from detkit.errors import UserError

log = logging.getLogger(__name__)


class CategoryMismatchError(UserError, ValueError):
    """A model's categories differ from those of the dataset it is evaluated on."""


class CategoryMap:
    """Maps COCO category ids (any integers, in any order) to contiguous labels ``0..C-1`` and back.

    Labels follow ascending category id, so the mapping does not depend on the order of the json's list
    (``sort=False`` keeps the given order: a model's labels renamed to another dataset's ids).
    """

    def __init__(self, categories: Sequence[dict], sort: bool = True) -> None:
        ordered = sorted(categories, key=lambda c: c["id"]) if sort else list(categories)
        self.ids: list[int] = [int(c["id"]) for c in ordered]
        self.names: list[str] = [str(c["name"]) for c in ordered]
        self._label_of = {cid: i for i, cid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def label_of(self, category_id: int) -> int:
        return self._label_of[category_id]

    def ids_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Original category ids for a tensor of contiguous labels (any shape, int64)."""
        return torch.as_tensor(self.ids, dtype=torch.int64, device=labels.device)[labels]

    def to_list(self) -> list[dict]:
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names)]

    def mapped_to(self, dataset: "CategoryMap", mapping: str = "strict", what: str = "the model") -> "CategoryMap":
        """This (a model's) map, checked against a dataset's; returns the map predictions must use.

        ``mapping="strict"``: ids and names must be the same, else :class:`CategoryMismatchError` listing both.
        ``mapping="by_name"``: every model class must name a dataset category; the model's labels then report the
        dataset's ids for those names (the dataset may have extra categories, which then have no predictions).
        """
        if mapping not in ("strict", "by_name"):
            raise ValueError(f"category_mapping must be 'strict' or 'by_name', got {mapping!r}")
        if self.to_list() == dataset.to_list():
            return self
        both = f"{what}: {self.to_list()}\n  dataset: {dataset.to_list()}"
        if mapping == "strict":
            raise CategoryMismatchError(
                f"the categories of {what} and of the dataset differ (ids or names):\n  {both}\n"
                "evaluate on a dataset with the training categories, or pass category_mapping=by_name to match "
                "classes by name")
        id_of = dict(zip(dataset.names, dataset.ids))
        missing = [n for n in self.names if n not in id_of]
        if missing:
            raise CategoryMismatchError(f"category_mapping=by_name: the dataset has no category named {missing}:"
                                        f"\n  {both}")
        return CategoryMap([{"id": id_of[n], "name": n} for n in self.names], sort=False)


@dataclass
class ImageRecord:
    """One image of the dataset, with its trainable boxes (``xyxy``, original pixels) and contiguous labels."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xyxy, crowd boxes excluded
    labels: np.ndarray  # int64 [N]
    num_crowd: int = 0


class CocoDetection(Dataset):
    """A COCO-format detection dataset, validated on construction.

    Each item is ``(image, target)``: ``image`` is ``uint8 [3, H, W]`` RGB after ``transform``; ``target`` holds
    ``boxes`` (float32 [N, 4], ``xyxy`` in the transformed image's pixels), ``labels`` (int64 [N], contiguous),
    ``image_id`` (the original COCO id), ``orig_size`` (int64 [2], original ``(height, width)``) and ``scale``
    (transformed pixels per original pixel, for mapping predictions back; letterbox padding is bottom/right).

    Crowd annotations (``iscrowd=1``) are never trained on; they stay in :attr:`coco_data` for evaluation, where
    COCOeval treats them as ignore regions. Images without annotations are kept.

    Args:
        ann_file: COCO annotation json.
        image_root: directory the images' ``file_name`` are relative to.
        transform: a :class:`detkit.data.transforms.DetectionTransform` (or any callable with its signature).
        skip_invalid: drop invalid images/annotations (and say how many and why) instead of refusing the dataset.
        check_images: open every image during validation (existence, decodability, size).
        subset_fraction: keep this fraction of the images (a fixed random subset drawn with ``subset_seed``),
            e.g. for label-budget studies.
        holdout_fraction: set aside this fraction of the images (a fixed random subset drawn with
            ``subset_seed``, independent of ``subset_fraction``'s draw) for model selection on the training split
            (see :func:`split_holdout`); ``subset_fraction`` then applies to the images left.
        holdout: be that held-out part (``True``) instead of the rest.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        transform: Callable | None = None,
        skip_invalid: bool = False,
        check_images: bool = True,
        subset_fraction: float = 1.0,
        subset_seed: int = 0,
        holdout_fraction: float = 0.0,
        holdout: bool = False,
    ) -> None:
        self.ann_file, self.image_root = Path(ann_file), Path(image_root)
        self.transform = transform
        data = load_coco_json(self.ann_file)
        report = validate_coco(self.ann_file, self.image_root, check_images=check_images, data=data)
        if not report.ok:
            if not skip_invalid:
                raise DatasetError(report)
            data, summary = drop_invalid(data, report)
            log.warning("%s\n%s", summary, report.format(max_lines=20))
        if not 0.0 < subset_fraction <= 1.0:
            raise ValueError(f"subset_fraction must be in (0, 1], got {subset_fraction}")
        if holdout or holdout_fraction:
            rest, held = split_holdout(data, holdout_fraction, subset_seed, self.ann_file, self.image_root)
            data = held if holdout else rest
        #: the images left after validation and the holdout, before the label budget (``subset_fraction``): what
        #: settings that must not depend on the budget are measured on (the automatic image size)
        self.pool_data = data
        if subset_fraction < 1.0 and not holdout:
            data = _subset(data, subset_fraction, subset_seed)
        self.coco_data = data
        self.categories = CategoryMap(data["categories"])
        self.records = self._build_records(data)

    def _build_records(self, data: dict) -> list[ImageRecord]:
        groups = group_by_image(data["annotations"])
        records = []
        for img in data["images"]:
            anns = groups.get(img["id"], [])
            trainable = [a for a in anns if not a.get("iscrowd", 0)]
            boxes = np.array([a["bbox"] for a in trainable], dtype=np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy: the single conversion point
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, img["width"])
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, img["height"])
            labels = np.array([self.categories.label_of(a["category_id"]) for a in trainable], dtype=np.int64)
            path, _ = resolve_image_path(self.image_root, img["file_name"])
            records.append(ImageRecord(img["id"], path, img["width"], img["height"], boxes, labels,
                                       num_crowd=len(anns) - len(trainable)))
        return records

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.item(index, item_seed(index))

    def item(self, index: int, seed: int | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Item ``index`` with its augmentation drawn from ``seed`` (``None``: the pipeline's continuing stream);
        ``dataset[index]`` is ``item(index, item_seed(index))``."""
        rec = self.records[index]
        try:
            image = read_rgb(rec.path)
        except OSError as e:  # the file changed after validation: still name the image
            raise OSError(f"{self.ann_file}: image id {rec.image_id}: {e}") from e
        boxes, labels, scale = rec.boxes, rec.labels, 1.0
        if self.transform is not None:
            image, boxes, labels, scale = self.transform(image, boxes, labels, seed=seed)
        target = {
            "boxes": torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
            "image_id": rec.image_id,
            "orig_size": torch.tensor([rec.height, rec.width], dtype=torch.int64),
            "scale": float(scale),
        }
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return tensor, target


#: Offsets ``subset_seed`` for the holdout draw, so that the held-out images are not the head of the label-budget draw.
HOLDOUT_SEED_OFFSET = 104_729


def _restrict(data: dict, keep: list[int]) -> dict:
    images = [data["images"][i] for i in sorted(keep)]
    ids = {im["id"] for im in images}
    return {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}


def split_holdout(data: dict, fraction: float, seed: int, source: Path | str = "the annotation file",
                  image_root: Path | str | None = None) -> tuple[dict, dict]:
    """Split a COCO dict's images into ``(rest, held_out)``: ``round(fraction * N)`` images drawn with ``seed`` are
    held out, with their annotations, for choosing settings (learning rates, warm-up, schedules) on the training
    split instead of on val. Both parts keep every category. Raises ``ValueError`` (naming ``source``) unless
    both parts get at least one image.

    Images are drawn by file, not by id: entries naming the same file (under ``image_root``, resolved; the
    ``file_name`` string without it) fall on the same side, so a picture listed twice is never trained on and
    scored at once. The draw takes whole files in a random order until ``round(fraction * N)`` entries are held
    out (more when the last file drawn has several entries); without such repeats it is a plain random subset."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction} ({source})")
    images = data["images"]
    n = len(images)
    target = round(n * fraction)
    groups: dict[Any, list[int]] = {}
    for i, im in enumerate(images):
        path = resolve_image_path(Path(image_root), im["file_name"])[0] if image_root is not None else None
        groups.setdefault(path if path is not None else ("file_name", str(im["file_name"])), []).append(i)
    files = list(groups.values())
    rng = np.random.default_rng(seed + HOLDOUT_SEED_OFFSET)
    chosen: list[int] = []
    if 1 <= target <= n - 1:
        for g in rng.permutation(len(files)).tolist():
            if len(chosen) + len(files[g]) > n - 1:
                continue  # a file with so many entries that nothing would be left to train on
            chosen += files[g]
            if len(chosen) >= target:
                break
    if not 1 <= len(chosen) <= n - 1:
        raise ValueError(f"a holdout of {fraction} of {n} images in {source} leaves {len(chosen)} held out and "
                         f"{n - len(chosen)} to train on: each part needs at least one image"
                         + (f" ({n} entries name {len(files)} distinct files)" if len(files) < n else ""))
    rest = sorted(set(range(n)) - set(chosen))
    return _restrict(data, rest), _restrict(data, chosen)


def _subset(data: dict, fraction: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = max(1, round(len(data["images"]) * fraction))
    return _restrict(data, rng.choice(len(data["images"]), size=n, replace=False).tolist())
