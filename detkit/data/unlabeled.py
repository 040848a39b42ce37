"""Datasets for self-supervised pretraining (unlabeled images) and for measuring encoders (image folders)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from detkit.data.image_files import ImageCheck, check_image_files, check_image_folder, read_rgb_or_substitute
from detkit.data.transforms import SeededPipeline, item_seed
from detkit.data.validate import load_coco_json


def list_images(root: str | Path, skip_invalid: bool = True) -> list[Path]:
    """Every readable image file under ``root`` (recursive, sorted), checked as
    :func:`detkit.data.image_files.check_image_folder` does (unreadable files named and skipped)."""
    return check_image_folder(root, skip_invalid=skip_invalid).files


#: Views at most this many pixels wide get no Gaussian blur by default (``blur_p=None``): the SimCLR paper blurs
#: its 224 px ImageNet views and leaves blur out for 32 px CIFAR, where a kernel of 10% of the side is 3 pixels and
#: blurring erases most of what is left to recognise.
NO_BLUR_UP_TO = 32


def default_blur_p(size: int, blur_p: float | None) -> float:
    """The blur probability for views of ``size`` pixels: ``blur_p`` if given, else 0.5 (the paper's ImageNet
    recipe) above :data:`NO_BLUR_UP_TO` and 0 at or below it (the paper's CIFAR recipe)."""
    if blur_p is not None:
        return float(blur_p)
    return 0.0 if size <= NO_BLUR_UP_TO else 0.5


def view_seeds(seed: int) -> tuple[int, int]:
    """The seeds of the two views of an item whose seed is ``seed`` (see :func:`item_seed`): two independent
    32-bit values, so each view of each item is its own draw, reproducible from (run seed, epoch, index, view)."""
    return hash((seed, 0)) % 2**32, hash((seed, 1)) % 2**32


class SimCLRViews:
    """Two independently augmented views of an image, as in the SimCLR paper: random resized crop (scale
    0.08-1), horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur
    (sigma 0.1-2, kernel ~10% of the side) with p=0.5 above 32 px and off at 32 px and below (``blur_p=None``, see
    :func:`default_blur_p`). Output ``uint8 [3, size, size]`` tensors (the encoder normalises).
    """

    def __init__(self, size: int = 64, crop_scale: tuple[float, float] = (0.08, 1.0), jitter: float = 0.4,
                 jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: float | None = None,
                 blur_sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        k = max(3, int(0.1 * size) // 2 * 2 + 1)  # kernel ~10% of the image side, odd
        self.blur_p = default_blur_p(size, blur_p)
        self.pipeline = SeededPipeline(A.Compose([
            A.RandomResizedCrop(size=(size, size), scale=tuple(crop_scale)),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 4, p=jitter_p),
            A.ToGray(p=gray_p),
            A.GaussianBlur(blur_limit=(k, k), sigma_limit=tuple(blur_sigma), p=self.blur_p),
        ]))

    def view(self, image: np.ndarray, seed: int | None = None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.pipeline(seed=seed, image=image)["image"]
                                                     .transpose(2, 0, 1)))

    def __call__(self, image: np.ndarray, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views drawn independently: with an item ``seed`` (loader workers), each view from its own seed
        (:func:`view_seeds`); without one (outside a training loader), both from the pipeline's continuing stream.

        (Drawing view 2 unseeded after a seeded view 1 would reseed it from the worker's constant
        ``torch.initial_seed()``: every item of a worker's epoch would then get the same second view.)
        """
        if seed is None:
            return self.view(image), self.view(image)
        s1, s2 = view_seeds(seed)
        return self.view(image, s1), self.view(image, s2)


class ResizeImage:
    """Deterministic evaluation transform for encoders: resize to ``size x size`` -> ``uint8 [3, size, size]``."""

    def __init__(self, size: int = 64) -> None:
        self.pipeline = A.Compose([A.Resize(size, size)])

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.pipeline(image=image)["image"].transpose(2, 0, 1)))


class UnlabeledImages(Dataset):
    """Images without labels: every image under a folder, or the images of a COCO json (``ann_file``) relative
    to ``root``. Items are whatever ``transform`` makes of the RGB image (two views for SimCLR).

    The images are checked on construction (:mod:`detkit.data.image_files`): unreadable files are named and
    skipped (:attr:`check` records them), or refused with ``skip_invalid=False``. A file that becomes unreadable
    later is warned about once and another image stands in for it
    (:func:`detkit.data.image_files.read_rgb_or_substitute`), so batches keep their size."""

    def __init__(self, root: str | Path, transform: Callable, ann_file: str | Path | None = None,
                 skip_invalid: bool = True) -> None:
        self.root = Path(root)
        if ann_file is None:
            self.check: ImageCheck = check_image_folder(self.root, skip_invalid, what="unlabeled images")
        else:
            images = load_coco_json(ann_file)["images"]
            names = [img.get("file_name") if isinstance(img, dict) else None for img in images]
            self.check = check_image_files(self.root, names, skip_invalid, what=f"{ann_file}: images under")
        self.files = self.check.files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        _, image = read_rgb_or_substitute(self.files, index)
        if isinstance(self.transform, SimCLRViews):
            return self.transform(image, seed=item_seed(index))
        return self.transform(image)


class ImageFolderDataset(Dataset):
    """An ImageFolder-style classification tree (one folder per class) -> ``(image, label)``.

    Args:
        root: the tree; class labels follow sorted folder names.
        transform: image transform.
        per_class: keep at most this many images per class (first in sorted order), for quick monitors.
        skip_invalid: skip unreadable image files (named once in the log) instead of refusing the tree; checked
            and handled during the run as :class:`UnlabeledImages` does.
    """

    def __init__(self, root: str | Path, transform: Callable, per_class: int | None = None,
                 skip_invalid: bool = True) -> None:
        root = Path(root)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        if not self.classes:
            raise FileNotFoundError(f"{root} is not an ImageFolder tree (one sub-folder per class)")
        self.check = check_image_folder(root, skip_invalid, what="ImageFolder tree")
        by_class: dict[str, list[Path]] = {name: [] for name in self.classes}
        for f in self.check.files:  # sorted; files directly under root belong to no class
            parts = f.relative_to(root).parts
            if len(parts) > 1 and parts[0] in by_class:
                by_class[parts[0]].append(f)
        self.samples = []
        for label, name in enumerate(self.classes):
            if not by_class[name]:
                raise FileNotFoundError(f"ImageFolder tree {root}: class folder {name!r} holds no readable images")
            self.samples += [(f, label) for f in by_class[name][:per_class]]
        self.files = [f for f, _ in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        j, image = read_rgb_or_substitute(self.files, index)  # a file broken since the check: another item
        return self.transform(image), self.samples[j][1]
