"""Unlabeled images for teacher-student self-training: each image as a weakly and a strongly augmented view with
the same geometry.

**Why the same geometry.** The teacher predicts on the weak view and its confident detections train the student on
the strong view (Unbiased Teacher, Liu et al. 2021; Soft Teacher). If the two views had different geometry (two
independent crops or flips), every pseudo-box would have to be mapped from one view to the other through both
transforms. Here the geometry is drawn once per image and shared: letterbox (longest side to ``size``, padding
bottom/right) and a random horizontal (optionally vertical) flip; the strong view adds only *photometric*
changes on top of the weak one (colour jitter, grayscale, Gaussian blur, and random erasing of rectangles, Unbiased
Teacher's recipe), which move no pixel. A box in the weak view is therefore the same box in the strong view, with
no remapping, and that holds by construction (tested on a known image). Random erasing can hide part of an object;
that is the point of the strong view (the student must recognise what the teacher saw whole), as in Unbiased
Teacher.

Items are ``(weak uint8 [3, S, S], strong uint8 [3, S, S], target)``; ``target`` holds the ground truth of the
image in the views' pixels when the "unlabeled" images come with labels (``ann_file``, used only to measure the
pseudo-labels' precision, never for training), else no boxes. :func:`unlabeled_collate` batches them into an
:class:`UnlabeledBatch`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from detkit.data.coco import CategoryMap, CategoryMismatchError, CocoDetection
from detkit.data.collate import pad_images
from detkit.data.image_files import ImageCheck, check_image_folder, read_rgb_or_substitute
from detkit.data.transforms import PAD_VALUE, SeededPipeline, item_seed
from detkit.data.unlabeled import view_seeds
from detkit.structures import Targets

log = logging.getLogger(__name__)

#: Unbiased Teacher's random erasing (torchvision ``RandomErasing`` three times): ``(p, area scale, aspect ratio)``.
ERASING = ((0.7, (0.05, 0.2), (0.3, 3.3)), (0.5, (0.02, 0.2), (0.1, 6.0)), (0.3, (0.02, 0.2), (0.05, 8.0)))


class UnlabeledBatch(NamedTuple):
    """A batch of unlabeled images: ``weak`` and ``strong`` views ``uint8 [B, 3, H, W]`` with the same geometry,
    and ``targets``: the images' ground truth in those pixels when known (to measure pseudo-labels; no valid rows
    otherwise). A named tuple of tensors: the loader pins it and Lightning moves it to the device."""

    weak: torch.Tensor
    strong: torch.Tensor
    targets: Targets


class WeakStrongViews:
    """``(image uint8 [H, W, 3], boxes [N, 4] xyxy, labels [N], seed=None) -> (weak, strong, boxes, labels,
    scale)``: the two views of one image (see the module docstring), ``uint8 [3, size, size]`` each, the boxes
    moved with the shared geometry, and the letterbox factor.

    Args:
        size: square letterbox side (the training size).
        hflip, vflip: flip probabilities (drawn once, shared by both views).
        jitter, jitter_p: colour jitter strength (brightness, contrast, saturation; hue a quarter of it) and its
            probability (Unbiased Teacher: 0.4, 0.8).
        gray_p: grayscale probability (0.2); blur_p: Gaussian blur probability (0.5), sigma in ``blur_sigma``.
        erasing: apply Unbiased Teacher's three random erasings (:data:`ERASING`, random fill).
    """

    def __init__(self, size: int = 320, hflip: float = 0.5, vflip: float = 0.0, jitter: float = 0.4,
                 jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: float = 0.5,
                 blur_sigma: Sequence[float] = (0.1, 2.0), erasing: bool = True) -> None:
        self.size = int(size)
        self.geometry = SeededPipeline(A.Compose(
            [A.LongestMaxSize(max_size=self.size), A.HorizontalFlip(p=hflip), A.VerticalFlip(p=vflip)],
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True,
                                     filter_invalid_bboxes=True)))
        k = max(3, int(0.1 * self.size) // 2 * 2 + 1)  # kernel ~10% of the side, odd (as the SimCLR views)
        photometric: list[A.BasicTransform] = [
            A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 4, p=jitter_p),
            A.ToGray(p=gray_p),
            A.GaussianBlur(blur_limit=(k, k), sigma_limit=tuple(blur_sigma), p=blur_p),
        ]
        if erasing:
            photometric += [A.Erasing(scale=scale, ratio=ratio, fill="random", p=p) for p, scale, ratio in ERASING]
        # its own stream when no seed is given: seeded like `geometry` from torch.initial_seed(), the two would read
        # the same numbers (the first hflip test would decide the first jitter test)
        self.photometric = SeededPipeline(A.Compose(photometric), stream=1)

    def _pad(self, image: np.ndarray) -> torch.Tensor:
        canvas = np.full((self.size, self.size, 3), PAD_VALUE, dtype=np.uint8)
        canvas[: image.shape[0], : image.shape[1]] = image
        return torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, seed: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, float]:
        scale = self.size / max(image.shape[0], image.shape[1])
        geometric, photometric = view_seeds(seed) if seed is not None else (None, None)
        out = self.geometry(seed=geometric, image=image, bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                            labels=np.asarray(labels, np.int64).reshape(-1))
        weak = out["image"]  # resized and flipped, not yet padded: the strong view's changes never touch padding
        strong = self.photometric(seed=photometric, image=weak)["image"]
        return (self._pad(weak), self._pad(strong), np.asarray(out["bboxes"], np.float32).reshape(-1, 4),
                np.asarray(out["labels"], np.int64).reshape(-1), scale)


class UnlabeledPairs(Dataset):
    """The unlabeled images of self-training as :class:`WeakStrongViews` pairs.

    Without ``ann_file`` every image under ``root`` is used, checked first as every unlabeled folder is
    (:func:`detkit.data.image_files.check_image_folder`: unreadable files named once and skipped, or refused with
    ``skip_invalid=False``; links out of the folder never followed). With ``ann_file`` (COCO json of the same
    images; validated like a training set, :class:`~detkit.data.coco.CocoDetection`) its images are used and
    their boxes come along in each item, to measure the pseudo-labels against; they are never trained on. Its
    categories must be the training set's (``categories``). A file that becomes unreadable during the run is
    warned about once and another image stands in for it, so batches keep their size. ``exclude``: image files
    never used (compared resolved), e.g. the held-out training images of ``data.holdout_fraction``, which are scored.
    """

    def __init__(self, root: str | Path, views: WeakStrongViews, ann_file: str | Path | None = None,
                 categories: CategoryMap | None = None, skip_invalid: bool = True,
                 exclude: Iterable[str | Path] = ()) -> None:
        self.root, self.views = Path(root), views
        self.labeled = ann_file is not None
        if ann_file is None:
            self.check: ImageCheck | None = check_image_folder(self.root, skip_invalid, what="unlabeled images")
            self.files = list(self.check.files)
            self.boxes = [np.zeros((0, 4), np.float32)] * len(self.files)
            self.labels = [np.zeros(0, np.int64)] * len(self.files)
            self.image_ids = [-1] * len(self.files)
            self.sizes = [None] * len(self.files)
        else:
            coco = CocoDetection(ann_file, self.root, transform=None, skip_invalid=skip_invalid)
            if categories is not None and coco.categories.to_list() != categories.to_list():
                raise CategoryMismatchError(
                    f"semi.unlabeled_ann={ann_file}: its categories {coco.categories.to_list()} differ from the "
                    f"training set's {categories.to_list()} (the pseudo-labels are measured class by class)")
            if not coco.records:
                raise FileNotFoundError(f"semi.unlabeled_ann={ann_file}: no usable images")
            self.check = None
            self.files = [r.path for r in coco.records]
            self.boxes = [r.boxes for r in coco.records]
            self.labels = [r.labels for r in coco.records]
            self.image_ids = [r.image_id for r in coco.records]
            self.sizes = [(r.height, r.width) for r in coco.records]
        excluded = {Path(f).resolve() for f in exclude}
        if excluded:
            keep = [i for i, f in enumerate(self.files) if Path(f).resolve() not in excluded]
            if not keep:
                raise FileNotFoundError(f"semi.unlabeled_images={root}: every image is excluded (held out for "
                                        "scoring)")
            if len(keep) < len(self.files):
                log.info("self-training: %d of the unlabeled images are held out for scoring and not used",
                         len(self.files) - len(keep))
            for name in ("files", "boxes", "labels", "image_ids", "sizes"):
                setattr(self, name, [getattr(self, name)[i] for i in keep])
        log.info("self-training on %d unlabeled images from %s%s", len(self.files), self.root,
                 f" (labels from {ann_file}, used only to measure the pseudo-labels)" if ann_file else "")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        j, image = read_rgb_or_substitute(self.files, index)
        weak, strong, boxes, labels, scale = self.views(image, self.boxes[j], self.labels[j], seed=item_seed(j))
        size = self.sizes[j] or image.shape[:2]
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels), "image_id": self.image_ids[j],
                  "orig_size": torch.tensor(size, dtype=torch.int64), "scale": float(scale)}
        return weak, strong, target


def unlabeled_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]) -> UnlabeledBatch:
    """``[(weak, strong, target), ...] -> UnlabeledBatch`` (views padded as labeled images are)."""
    weak, strong, targets = zip(*batch)
    return UnlabeledBatch(pad_images(weak), pad_images(strong), Targets.from_list(targets))
