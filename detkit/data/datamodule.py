"""Lightning data module for COCO-format detection datasets."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from detkit.data.coco import CategoryMap, CocoDetection
from detkit.data.collate import detection_collate
from detkit.data.mosaic import Mosaic
from detkit.data.shuffle import epoch_shuffled_loader
from detkit.data.transforms import DetectionTransform

log = logging.getLogger(__name__)

#: The unlabeled loader's order and augmentation seeds derive from ``seed + UNLABELED_SEED_OFFSET``, so they are not
#: the labeled loader's draws (the same base seed would give labeled item i and unlabeled item i the same flips).
UNLABELED_SEED_OFFSET = 7_919


class DetectionDataModule(L.LightningDataModule):
    """Train/val/test splits of COCO-format datasets, validated in :meth:`setup` before any training starts.

    The training loader is a ``StatefulDataLoader`` so that resuming from a checkpoint continues the same epoch
    at the same batch with the same order (Lightning stores its state in the checkpoint).

    Args:
        train_ann / train_images: training annotation json and image root (optional for eval-only use).
        val_ann / val_images, test_ann / test_images: optional evaluation splits.
        train_transform / eval_transform: box-aware transforms; defaults letterbox to ``image_size``.
        image_size: side of the square letterbox (used for the default transforms).
        batch_size, num_workers: loader settings (evaluation uses the same batch size).
        skip_invalid: drop invalid images/annotations (with a summary) instead of refusing the dataset.
        check_images: decode every image during validation.
        train_fraction, subset_seed: keep a fixed random fraction of the training images (label budget).
        holdout_fraction: choose settings on the training split, never on val: this fraction of the training
            images (drawn with ``subset_seed``, before ``train_fraction`` is applied to the rest) is never trained
            on and becomes the "val" split (validation, checkpoint monitor, final metrics); ``val_ann`` is then
            not read. 0 (default): no holdout.
        mosaic: probability of a 2x2 mosaic per training item (0 disables; see :class:`detkit.data.mosaic.Mosaic`).
        seed: with the epoch, fixes the shuffle order and the workers' seeds (and so the augmentations) of every
            epoch (:class:`detkit.data.shuffle.EpochShuffle`), so resumed runs reproduce uninterrupted ones.
        pin_memory: pin batches in page-locked memory so that host-to-GPU copies run asynchronously; ``None``
            pins when the trainer runs on a GPU.
    """

    def __init__(
        self,
        train_ann: str | None = None,
        train_images: str | None = None,
        val_ann: str | None = None,
        val_images: str | None = None,
        test_ann: str | None = None,
        test_images: str | None = None,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        image_size: int | None = None,
        batch_size: int = 4,
        num_workers: int = 2,
        skip_invalid: bool = False,
        check_images: bool = True,
        train_fraction: float = 1.0,
        subset_seed: int = 0,
        holdout_fraction: float = 0.0,
        mosaic: float = 0.0,
        seed: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        self.mosaic, self.seed, self._pin_memory = mosaic, seed, pin_memory
        self.paths = {"train": (train_ann, train_images), "val": (val_ann, val_images),
                      "test": (test_ann, test_images)}
        if image_size is None and (train_transform is None or eval_transform is None):
            raise ValueError("DetectionDataModule needs image_size to build its transforms (data.image_size: null is "
                             "chosen from the training boxes by detkit-train: cli/train.py build_datamodule)")
        self.train_transform = train_transform or DetectionTransform(image_size, train=True)
        self.eval_transform = eval_transform or DetectionTransform(image_size, train=False)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.skip_invalid, self.check_images = skip_invalid, check_images
        self.train_fraction, self.subset_seed = train_fraction, subset_seed
        self.holdout_fraction = float(holdout_fraction or 0.0)
        if self.holdout_fraction:
            if train_ann is None or train_images is None:
                raise ValueError("data.holdout_fraction holds out part of the training split: set data.train_ann "
                                 "and data.train_images")
            if val_ann is not None:
                log.warning("data.holdout_fraction=%g: validating on held-out training images; data.val_ann=%s is "
                            "not used", self.holdout_fraction, val_ann)
            self.paths["val"] = (train_ann, train_images)
        self.datasets: dict[str, CocoDetection] = {}
        self.unlabeled: Dataset | None = None
        self.unlabeled_collate: Callable | None = None
        self.unlabeled_batch_size = batch_size

    def set_transforms(self, train_transform: Callable, eval_transform: Callable) -> None:
        """Replace the transforms, also in the splits already built (``detkit-train`` with ``data.image_size:
        null`` builds and validates the splits first, then chooses the size from the training split's boxes)."""
        self.train_transform, self.eval_transform = train_transform, eval_transform
        for split, dataset in self.datasets.items():
            dataset.transform = train_transform if split == "train" else eval_transform

    def add_unlabeled(self, dataset: Dataset, collate_fn: Callable, batch_size: int | None = None) -> None:
        """Self-training: the training loader yields ``{"labeled": (images, Targets), "unlabeled": batch}``
        (Lightning combines the two loaders), the unlabeled batches (``batch_size``, default the labeled one)
        drawn from ``dataset`` and batched by ``collate_fn`` (:func:`detkit.data.weak_strong.unlabeled_collate`).
        An epoch is still one pass over the labeled images: the unlabeled loader gives exactly as many batches per
        process, drawn from a stream of shuffled passes over the unlabeled images (:class:`EpochStream`), so
        schedules, validation and checkpoints keep their meaning whatever the two sets' sizes."""
        self.unlabeled, self.unlabeled_collate = dataset, collate_fn
        self.unlabeled_batch_size = int(batch_size or self.batch_size)

    def _build(self, split: str) -> CocoDetection | None:
        if split in self.datasets:
            return self.datasets[split]
        ann, images = self.paths[split]
        if ann is None:
            return None
        if images is None:
            raise ValueError(f"data.{split}_images must be set together with data.{split}_ann={ann}")
        train = split == "train"
        holdout = split == "val" and bool(self.holdout_fraction)
        dataset = CocoDetection(
            Path(ann), Path(images), transform=self.train_transform if train else self.eval_transform,
            skip_invalid=self.skip_invalid, check_images=self.check_images,
            subset_fraction=self.train_fraction if train else 1.0, subset_seed=self.subset_seed,
            holdout_fraction=self.holdout_fraction if split in ("train", "val") else 0.0, holdout=holdout,
        )
        what = f"held out of {ann}: data.holdout_fraction={self.holdout_fraction:g}" if holdout else ann
        log.info("%s split: %d images, %d classes (%s)", split, len(dataset), dataset.num_classes, what)
        self.datasets[split] = dataset
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Build (and validate) the splits the stage needs; safe to call more than once."""
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], None: ["train", "val", "test"]}
        for split in splits.get(stage, ["val"]):
            self._build(split)
        train, val = self.datasets.get("train"), self.datasets.get("val")
        if train is not None and val is not None and train.categories.ids != val.categories.ids:
            raise ValueError(f"train and val category lists differ: {train.categories.to_list()} vs "
                             f"{val.categories.to_list()}")

    @property
    def categories(self) -> CategoryMap:
        for split in ("train", "val", "test"):
            dataset = self._build(split)
            if dataset is not None:
                return dataset.categories
        raise ValueError("no dataset configured: set data.train_ann/data.train_images or data.val_ann/val_images")

    @property
    def pin_memory(self) -> bool:
        if self._pin_memory is not None:
            return self._pin_memory
        accelerator = getattr(self.trainer, "accelerator", None) if self.trainer is not None else None
        return type(accelerator).__name__ == "CUDAAccelerator"

    def train_dataloader(self) -> StatefulDataLoader | dict[str, StatefulDataLoader]:
        dataset = self.datasets["train"]
        if self.mosaic > 0:
            dataset = Mosaic(dataset, self.mosaic)
        labeled = epoch_shuffled_loader(dataset, self.seed, self.trainer, self.batch_size,
                                        num_workers=self.num_workers, collate_fn=detection_collate,
                                        pin_memory=self.pin_memory)
        if self.unlabeled is None:
            return labeled
        # as many unlabeled batches per process as labeled ones (the labeled loader's count under DDP's sharding)
        world = max(1, getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        per_rank = math.ceil(len(dataset) / world)
        batches = per_rank // self.batch_size if labeled.drop_last else math.ceil(per_rank / self.batch_size)
        unlabeled = epoch_shuffled_loader(
            self.unlabeled, UNLABELED_SEED_OFFSET + self.seed, self.trainer, self.unlabeled_batch_size,
            per_epoch=max(1, batches) * self.unlabeled_batch_size * world, num_workers=self.num_workers,
            collate_fn=self.unlabeled_collate, pin_memory=self.pin_memory)
        return {"labeled": labeled, "unlabeled": unlabeled}

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=detection_collate, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


class PretrainDataModule(L.LightningDataModule):
    """Unlabeled images for SimCLR, plus an optional labeled ImageFolder pair for the kNN monitor.

    Args:
        images: a folder of images (recursive), or the image root of ``ann_file``.
        ann_file: optional COCO json whose images are used (e.g. a detection dataset's train split).
        image_size: side of the random resized crops.
        crop_scale: crop area range of the random resized crop.
        blur_p: Gaussian-blur probability; ``None``: 0.5 for views above 32 px (the paper's ImageNet recipe), 0 at
            32 px and below (its CIFAR recipe; see :func:`detkit.data.unlabeled.default_blur_p`).
        batch_size, num_workers: loader settings.
        knn_train / knn_val: ImageFolder trees (bank / queries) for the kNN monitor; ``knn_per_class`` caps them.
        augment_on: ``"cpu"``: views made by albumentations in the loader workers, one image at a time;
            ``"device"``: the loader letterboxes each image into a ``source_size`` canvas (default twice
            ``image_size``; images are shrunk to fit, never enlarged) and
            :class:`detkit.data.device_views.DeviceSimCLRViews` makes both views of the whole batch on the
            training device (same recipe; ``solarize_p`` only there).
        skip_invalid: image files that do not decode (in ``images`` and the kNN folders) are named and skipped,
            and counted in ``pretrain_metrics.json``; ``False`` refuses them instead (checked before training, see
            :mod:`detkit.data.image_files`).
    """

    def __init__(self, images: str, ann_file: str | None = None, image_size: int = 96,
                 crop_scale: tuple[float, float] = (0.08, 1.0), blur_p: float | None = None, batch_size: int = 64,
                 num_workers: int = 2, knn_train: str | None = None, knn_val: str | None = None,
                 knn_per_class: int | None = 100, seed: int = 0, augment_on: str = "cpu",
                 source_size: int | None = None, solarize_p: float = 0.0, skip_invalid: bool = True) -> None:
        super().__init__()
        self.seed = seed
        from detkit.data.device_views import DeviceSimCLRViews, SourceImage
        from detkit.data.unlabeled import ImageFolderDataset, ResizeImage, SimCLRViews, UnlabeledImages

        if augment_on not in ("cpu", "device"):
            raise ValueError(f"data.augment_on must be 'cpu' or 'device', got {augment_on!r}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.device_views = None
        if augment_on == "device":  # the loader decodes and letterboxes; the views are made on the device
            self.device_views = DeviceSimCLRViews(image_size, tuple(crop_scale), blur_p=blur_p, solarize_p=solarize_p)
            transform = SourceImage(source_size or 2 * image_size)
        else:
            if solarize_p:
                raise ValueError("data.solarize_p needs data.augment_on=device")
            transform = SimCLRViews(image_size, tuple(crop_scale), blur_p=blur_p)
        self._generators: dict[str, torch.Generator] = {}  # device views: one generator per device
        self.dataset = UnlabeledImages(images, transform, ann_file=ann_file, skip_invalid=skip_invalid)
        self.knn_bank = self.knn_query = None
        if knn_train and knn_val:
            self.knn_bank = ImageFolderDataset(knn_train, ResizeImage(image_size), knn_per_class, skip_invalid)
            self.knn_query = ImageFolderDataset(knn_val, ResizeImage(image_size), knn_per_class, skip_invalid)
        log.info("pretraining on %d unlabeled images from %s", len(self.dataset), images)

    def train_dataloader(self) -> StatefulDataLoader:
        # every epoch sees new views: item_seed() depends on the epoch's base seed
        return epoch_shuffled_loader(self.dataset, self.seed, self.trainer, self.batch_size,
                                     num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """With ``augment_on="device"`` the training batch arrives as ``(letterboxed uint8 images, valid sizes)``
        on the device: both views of every image are made here, from a generator seeded by (``seed``, batch number,
        rank) (:func:`detkit.data.device_views.device_view_seed`), and the module receives ``(view1, view2)`` as
        from the CPU path. Lightning calls this hook after moving the batch (the module defines none)."""
        if self.device_views is None or self.trainer is None or not self.trainer.training:
            return batch
        from detkit.data.device_views import device_view_seed

        images, sizes = batch
        key = str(images.device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=images.device)
        # The batch's number in the run: Lightning counts a batch "ready" after this hook, so the running count is
        # this batch's 0-based index over all epochs (restored from a checkpoint on resume).
        batch_number = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        generator = self._generators[key].manual_seed(device_view_seed(self.seed, batch_number,
                                                                       self.trainer.global_rank))
        both = self.device_views(images, sizes, generator)
        return both[: len(images)], both[len(images):]
