"""LightningModule for detectors (two-stage and one-stage share it)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from detkit.data.coco import CategoryMap
from detkit.eval.coco_eval import STAT_KEYS, EvalResult, detections_to_results, evaluate_coco
from detkit.lit.ema import ModelEMA
from detkit.lit.optim import WarmupSchedule, param_groups, total_training_steps
from detkit.models.detection.boxes import clip_boxes

log = logging.getLogger(__name__)


def plain_config(cfg: Any) -> Any:
    """A Hydra/OmegaConf node as plain Python containers (safe for checkpoints loaded with weights_only)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


def to_original_pixels(boxes: torch.Tensor, target: dict) -> torch.Tensor:
    """Map ``[n, 4]`` xyxy boxes from letterboxed input pixels back to the original image (undo scale, clip)."""
    h, w = (int(v) for v in target["orig_size"])
    return clip_boxes(boxes / float(target["scale"]), h, w)


class DetectionModule(L.LightningModule):
    """Trains and evaluates a detector built from config.

    The module keeps its configuration as plain dicts (saved as hyperparameters), so a checkpoint alone rebuilds
    the model: ``DetectionModule.from_checkpoint(path)``.

    Args:
        backbone: config of :class:`detkit.models.backbones.Backbone` (``init`` = SimCLR encoder file).
        detector: config of the detector (``FasterRCNN`` or ``YOLO``), called with ``backbone`` and ``num_classes``.
        categories: the dataset's COCO categories ``[{"id", "name"}]`` (defines the classes).
        optimizer: config of a ``torch.optim`` optimiser (``_partial_``-style: everything but the parameters).
        scheduler: config of :class:`detkit.lit.optim.WarmupSchedule`.
        backbone_lr_mult: learning-rate multiplier for the encoder (e.g. 0.1 for a pretrained encoder).
        eval_backend: ``"faster_coco_eval"`` or ``"pycocotools"``.
        channels_last: run the model in channels-last memory format (faster convolutions on GPUs with AMP).
        image_size: the letterbox size the model is trained at (prediction and evaluation reuse it).
        ema_decay: keep an exponential moving average of the detector's weights and evaluate/predict with it.
        seed: seeds the training-time sampling (with the step number, so resumed runs draw the same samples).
    """

    def __init__(
        self,
        backbone: dict,
        detector: dict,
        categories: list[dict],
        optimizer: dict,
        scheduler: dict,
        backbone_lr_mult: float = 1.0,
        eval_backend: str = "faster_coco_eval",
        channels_last: bool = False,
        image_size: int | None = None,
        ema_decay: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        backbone, detector, categories = plain_config(backbone), plain_config(detector), plain_config(categories)
        optimizer, scheduler = plain_config(optimizer), plain_config(scheduler)
        self.save_hyperparameters({"backbone": backbone, "detector": detector, "categories": list(categories),
                                   "optimizer": optimizer, "scheduler": scheduler,
                                   "backbone_lr_mult": backbone_lr_mult, "eval_backend": eval_backend,
                                   "channels_last": channels_last, "image_size": image_size,
                                   "ema_decay": ema_decay, "seed": seed})
        self.categories = CategoryMap(categories)
        self.detector = instantiate(detector, backbone=instantiate(backbone), num_classes=len(self.categories),
                                    _recursive_=True)
        if channels_last:
            self.detector.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(self.detector, ema_decay) if ema_decay else None
        self.last_eval: EvalResult | None = None
        self._results: list[dict] = []

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "DetectionModule":
        """Rebuild a trained model from a Lightning checkpoint (loaded with ``weights_only=True``)."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        hp = dict(ckpt["hyper_parameters"])
        hp["backbone"] = {**hp["backbone"], "init": None}  # weights come from the checkpoint, not the encoder file
        module = cls(**hp)
        module.load_state_dict(ckpt["state_dict"])
        return module

    # ---- training -------------------------------------------------------------------------------------------
    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def on_fit_start(self) -> None:
        # The EMA copy stays in eval mode on purpose (it is never trained), which makes Lightning warn "Found N
        # module(s) in eval mode at the start of training" on every run; that warning is meant for modules a user
        # forgot to switch back, so here it is only noise.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

    def training_step(self, batch: tuple[torch.Tensor, list[dict]], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        # Sampling randomness is a function of (seed, step): a resumed run draws exactly what it would have drawn.
        generator = torch.Generator(device=images.device).manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        losses = self.detector.loss(self._images(images), targets, generator=generator)
        total = sum(losses.values())
        bs = len(targets)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.detector)

    @property
    def inference_model(self) -> torch.nn.Module:
        """The EMA weights when kept, else the trained weights."""
        return self.ema.module if self.ema is not None else self.detector

    def configure_optimizers(self) -> dict:
        opt_cfg = dict(self.hparams.optimizer)
        lr, wd = float(opt_cfg.pop("lr")), float(opt_cfg.pop("weight_decay", 0.0))
        groups = param_groups(self.detector.named_parameters(), wd, lr,
                              {"backbone.encoder.": self.hparams.backbone_lr_mult})
        optimizer = get_class(opt_cfg.pop("_target_"))(groups, lr=lr, **opt_cfg)
        schedule = instantiate(self.hparams.scheduler)
        assert isinstance(schedule, WarmupSchedule)
        scheduler = schedule.build(optimizer, total_training_steps(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- prediction and evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor, targets: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Detections per image in original image pixels, with original COCO category ids."""
        dets = self.inference_model.predict(self._images(images)).to_list()
        out = []
        for det, target in zip(dets, targets):
            out.append({"boxes": to_original_pixels(det["boxes"].float(), target), "scores": det["scores"].float(),
                        "labels": det["labels"], "category_ids": self.categories.ids_of(det["labels"]),
                        "image_id": target.get("image_id")})
        return out

    def on_validation_epoch_start(self) -> None:
        self._results = []

    def validation_step(self, batch: tuple[torch.Tensor, list[dict]], batch_idx: int) -> None:
        images, targets = batch
        for det in self.predict_batch(images, targets):
            self._results += detections_to_results(det["boxes"], det["scores"], det["category_ids"], det["image_id"])

    def test_step(self, batch: tuple[torch.Tensor, list[dict]], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def gather_results(self) -> list[dict]:
        """All processes' results (under DDP every rank gets the full list)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self._results)
            seen, merged = set(), []
            for part in parts:  # DistributedSampler pads with repeated images: keep each image's first copy
                ids = {r["image_id"] for r in part} - seen
                merged += [r for r in part if r["image_id"] in ids]
                seen |= ids
            return merged
        return list(self._results)

    def _evaluate(self, split: str) -> None:
        datamodule = self.trainer.datamodule
        gt = datamodule.datasets[split].coco_data
        result = evaluate_coco(gt, self.gather_results(), backend=self.hparams.eval_backend)
        self.last_eval = result
        self.log_dict({f"{split}/{k}": float(result.stats[k]) for k in STAT_KEYS}, sync_dist=False)
        log.info("%s epoch %d: AP %.4f AP50 %.4f AR100 %.4f", split, self.current_epoch, result.stats["AP"],
                 result.stats["AP50"], result.stats["AR100"])

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")
