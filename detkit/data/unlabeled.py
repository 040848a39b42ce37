"""Datasets for self-supervised pretraining (unlabeled images) and for measuring encoders (image folders)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from detkit.data.coco import read_rgb
from detkit.data.convert import IMAGE_SUFFIXES
from detkit.data.transforms import SeededPipeline, item_seed
from detkit.data.validate import load_coco_json, resolve_image_path


def list_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursive, sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return files


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
        (:func:`view_seeds`); without one (the main process), both from the pipeline's continuing stream.

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
    to ``root``. Items are whatever ``transform`` makes of the RGB image (two views for SimCLR)."""

    def __init__(self, root: str | Path, transform: Callable, ann_file: str | Path | None = None) -> None:
        self.root = Path(root)
        if ann_file is None:
            self.files = list_images(self.root)
        else:
            data = load_coco_json(ann_file)
            self.files = []
            for img in data["images"]:
                path, reason = resolve_image_path(self.root, img.get("file_name"))
                if path is None:
                    raise ValueError(f"{ann_file}: image id {img.get('id')}: {reason}")
                self.files.append(path)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            image = read_rgb(self.files[index])
        except OSError as e:
            raise OSError(f"unlabeled image {self.files[index]}: {e}") from e
        if isinstance(self.transform, SimCLRViews):
            return self.transform(image, seed=item_seed(index))
        return self.transform(image)


class ImageFolderDataset(Dataset):
    """An ImageFolder-style classification tree (one folder per class) -> ``(image, label)``.

    Args:
        root: the tree; class labels follow sorted folder names.
        transform: image transform.
        per_class: keep at most this many images per class (first in sorted order), for quick monitors.
    """

    def __init__(self, root: str | Path, transform: Callable, per_class: int | None = None) -> None:
        root = Path(root)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        if not self.classes:
            raise FileNotFoundError(f"{root} is not an ImageFolder tree (one sub-folder per class)")
        self.samples = []
        for label, name in enumerate(self.classes):
            files = list_images(root / name)
            self.samples += [(f, label) for f in files[:per_class]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(read_rgb(path)), label
