"""LightningModule for detectors (two-stage and one-stage share it)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from detkit.data.coco import CategoryMap
from detkit.eval.coco_eval import STAT_KEYS, EvalResult, detections_to_results, evaluate_coco
from detkit.lit.divergence import DivergenceMonitor
from detkit.lit.ema import ModelEMA
from detkit.lit.optim import LrMultsError, WarmupSchedule, module_lr_mults, param_groups, total_training_steps
from detkit.models.detection.boxes import clip_boxes
from detkit.structures import Detections, Targets

log = logging.getLogger(__name__)

#: ``torch.compile`` modes that replay the step as CUDA graphs (cudagraph trees).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def plain_config(cfg: Any) -> Any:
    """A Hydra/OmegaConf node as plain Python containers (safe for checkpoints loaded with weights_only)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


def to_original_pixels(dets: Detections, targets: Targets) -> torch.Tensor:
    """Map the padded boxes ``[B, K, 4]`` from letterboxed input pixels back to each original image (undo the
    scale, clip to the original size), batched on the detections' device."""
    sizes = targets.orig_sizes.to(dets.boxes.device)
    scales = targets.scales.to(dets.boxes.device)
    return clip_boxes(dets.boxes / scales[:, None, None], sizes[:, 0, None], sizes[:, 1, None])


def stage_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """``{"backbone.encoder.layer1": [parameter names], ...}``: the stage names (``stem``, ``layer1..layer4``) of
    every encoder in ``model`` that groups its parameters by stage (``stage_parameters()``; timm encoders, whose
    own module names differ from model to model)."""
    aliases: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        if callable(getattr(module, "stage_parameters", None)):
            base = f"{path}." if path else ""
            for stage, names in module.stage_parameters().items():
                aliases[base + stage] = [base + n for n in names]
    return aliases


def freeze_parameters(model: torch.nn.Module, prefixes: list[str]) -> int:
    """Set ``requires_grad=False`` on every parameter whose name starts with one of ``prefixes`` (or that belongs to
    an encoder stage named by one, e.g. ``backbone.encoder.layer1``, see :func:`stage_aliases`); returns how many
    tensors were frozen. A prefix that names no parameter is an error that lists the model's top-level parts."""
    names = [n for n, _ in model.named_parameters()]
    aliases = stage_aliases(model)
    selected: set[str] = set()
    for prefix in prefixes:
        hits = {n for n in names if n == prefix or n.startswith(prefix.rstrip(".") + ".")}
        hits |= set(aliases.get(prefix.rstrip("."), ()))
        if not hits:
            parts = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"model.freeze: {prefix!r} names no parameter of the detector; its parts are {parts} "
                             f"(a prefix such as 'backbone', 'backbone.encoder.layer1', 'rpn', 'roi_heads.box_head')")
        selected |= hits
    count = 0
    for n, p in model.named_parameters():
        if n in selected:
            p.requires_grad_(False)
            count += 1
    return count


class DetectionModule(L.LightningModule):
    """Trains and evaluates a detector built from config.

    The module keeps its configuration as plain dicts (saved as hyperparameters), so a checkpoint alone rebuilds
    the model: ``DetectionModule.from_checkpoint(path)``.

    Args:
        detector: config of the detector (``FasterRCNN`` or ``YOLO``) with its ``backbone`` node
            (``backbone.init`` = SimCLR encoder file); ``num_classes`` comes from ``categories``.
        categories: the dataset's COCO categories ``[{"id", "name"}]`` (defines the classes).
        optimizer: config of a ``torch.optim`` optimiser (``_partial_``-style: everything but the parameters).
        scheduler: config of :class:`detkit.lit.optim.WarmupSchedule`.
        backbone_lr_mult: learning-rate multiplier for the encoder (e.g. 0.1 for a pretrained encoder).
        lr_mults: learning-rate multipliers by the detector's module path, e.g. ``{"roi_heads.box_predictor": 0.25}``
            (every parameter under that module; the longest matching path wins; ``backbone_lr_mult`` is the
            shorthand for ``{"backbone.encoder": m}`` and an explicit entry for the same path overrides it). A path
            that names no parameter is an error, so a typo cannot silently train at the full rate.
        head_lr_mult: learning-rate multiplier for the detector's box head (``roi_heads`` of Faster R-CNN, ``head``
            of YOLO): the shorthand for ``{detector.HEAD: m}``; an explicit ``lr_mults`` entry for that path wins.
        eval_backend: ``"faster_coco_eval"`` or ``"pycocotools"``.
        channels_last: run the model in channels-last memory format (faster convolutions on GPUs with AMP).
        image_size: the letterbox size the model is trained at (prediction and evaluation reuse it).
        ema_decay: keep an exponential moving average of the detector's weights and evaluate/predict with it.
        seed: seeds the training-time sampling (with the step number, so resumed runs draw the same samples).
        compile: run the detector's loss (the whole training forward, and through AOTAutograd its backward) under
            ``torch.compile``: ``true`` (default mode) or a mode name (``"reduce-overhead"``: CUDA graphs,
            ``"max-autotune"``). In the CUDA-graph modes every step begins a new graph generation and the losses
            are copied out of the graph's memory, which the next replay overwrites (Lightning keeps logged values
            past the step).
        divergence_check_every: check the loss terms for non-finite values every this many steps (see
            :mod:`detkit.lit.divergence`; no host synchronisation on a GPU).
        l1_penalty: ``lambda`` of an L1 penalty ``lambda * sum |w|`` over the weights that take weight decay (not
            norms or biases), added to the loss beside the optimiser's weight decay (L2). 0 disables it.
        freeze: parameter-name prefixes of the detector to freeze (``requires_grad=False``), e.g. ``[backbone]``
            to train only the heads (linear-probe-style fine-tuning), ``[backbone, rpn]`` to train the RoI heads
            only. Freezing encoder stages with their BatchNorm statistics is ``detector.backbone.freeze_at``.
        lr_reference_batch: when set, the linear scaling rule: every learning rate is multiplied by
            ``effective batch / lr_reference_batch`` (effective batch = ``data.batch_size x world size x
            accumulate_grad_batches``), so ``optimizer.lr`` is the rate for the reference batch. ``None``: the
            learning rate is used as given.
    """

    def __init__(
        self,
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
        compile: bool | str = False,
        divergence_check_every: int = 1,
        l1_penalty: float = 0.0,
        freeze: list[str] | tuple[str, ...] = (),
        lr_reference_batch: int | None = None,
        lr_mults: dict[str, float] | None = None,
        head_lr_mult: float = 1.0,
    ) -> None:
        super().__init__()
        detector, categories = plain_config(detector), plain_config(categories)
        optimizer, scheduler = plain_config(optimizer), plain_config(scheduler)
        self.save_hyperparameters({"detector": detector, "categories": list(categories), "optimizer": optimizer,
                                   "scheduler": scheduler, "backbone_lr_mult": backbone_lr_mult,
                                   "eval_backend": eval_backend, "channels_last": channels_last,
                                   "image_size": image_size, "ema_decay": ema_decay, "seed": seed,
                                   "compile": compile, "divergence_check_every": divergence_check_every,
                                   "l1_penalty": l1_penalty, "freeze": list(freeze or []),
                                   "lr_reference_batch": lr_reference_batch,
                                   "lr_mults": dict(plain_config(lr_mults) or {}), "head_lr_mult": head_lr_mult})
        self.categories = CategoryMap(categories)
        self.detector = instantiate(detector, num_classes=len(self.categories), _recursive_=True)
        freeze_parameters(self.detector, list(freeze or []))
        # learning-rate multipliers by parameter-name prefix, checked here so a misspelt path fails before training
        shorthand = {"backbone.encoder": backbone_lr_mult} if backbone_lr_mult != 1.0 else {}
        if head_lr_mult != 1.0:
            head = getattr(type(self.detector), "HEAD", None)
            if head is None:
                raise LrMultsError(f"head_lr_mult={head_lr_mult}: {type(self.detector).__name__} names no box head "
                                   "(class attribute HEAD); use model.lr_mults={MODULE_PATH: m}")
            shorthand[head] = head_lr_mult
        self.lr_mults = module_lr_mults(self.detector, {**shorthand, **self.hparams.lr_mults})
        if channels_last:
            self.detector.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(self.detector, ema_decay) if ema_decay else None
        self.last_eval: EvalResult | None = None
        self.last_results: list[dict] = []  # the COCO results last evaluated
        self._results: list[dict] = []
        self._generators: dict[str, torch.Generator] = {}
        self._loss_fn: Callable | None = None
        self.divergence = DivergenceMonitor(every=divergence_check_every)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "DetectionModule":
        """Rebuild a trained model from a Lightning checkpoint (loaded with ``weights_only=True``)."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        hp = dict(ckpt["hyper_parameters"])
        hp.pop("semi", None)  # self-training's settings: inference needs only the teacher, saved as the EMA
        if "detector" not in hp or "backbone" not in hp["detector"]:
            raise ValueError(f"{path} is not a checkpoint of this detkit version's DetectionModule (no "
                             "detector.backbone in its hyper-parameters)")
        detector = dict(hp["detector"])
        detector["backbone"] = {**detector["backbone"], "init": None}  # weights come from the checkpoint
        hp["detector"] = detector
        module = cls(**hp)
        module.load_state_dict(ckpt["state_dict"])
        return module

    # ---- training -------------------------------------------------------------------------------------------
    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def sampling_generator(self, device: torch.device) -> torch.Generator:
        """This batch's generator for anchor/RoI sampling: one per device, created once and reseeded every batch
        from (seed, the batch's number in the run, process rank), so a resumed run draws exactly what it would have
        drawn, and neither the micro-batches of one accumulation group nor the DDP ranks share their draws
        (reseeding is host-side)."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        trainer = self._trainer
        batch = trainer.fit_loop.epoch_loop.total_batch_idx if trainer is not None else self.global_step
        rank = trainer.global_rank if trainer is not None else 0
        return self._generators[key].manual_seed(hash((self.hparams.seed, batch, rank)) % 2**63)

    @property
    def loss_fn(self) -> Callable:
        """The detector's ``loss``, compiled with ``torch.compile`` when ``compile`` is set."""
        if self._loss_fn is None:
            mode = self.hparams.compile
            if not mode:
                self._loss_fn = self.detector.loss
            else:
                self._loss_fn = torch.compile(self.detector.loss, mode=None if mode is True else str(mode))
        return self._loss_fn

    def on_fit_start(self) -> None:
        # The EMA copy stays in eval mode on purpose (it is never trained), which makes Lightning warn "Found N
        # module(s) in eval mode at the start of training" on every run; that warning is meant for modules a user
        # forgot to switch back, so here it is only noise.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        opt = self.hparams.optimizer
        self.divergence.hint = (
            f"What to try: a lower learning rate (model.optimizer.lr, now {opt.get('lr')}), tighter gradient clipping "
            f"(trainer.gradient_clip_val, now {self.trainer.gradient_clip_val}; e.g. 1), a longer warm-up (model.scheduler.warmup=500, in steps). The last "
            "checkpoint saved before this step is unaffected.")

    def training_losses(self, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        """The named loss terms of one training batch (their sum is minimised) and its batch size. Subclasses add
        terms (:class:`detkit.lit.semi.SelfTrainingModule`: the unsupervised ones)."""
        images, targets = batch
        # Compiled, the samplers draw from torch's global RNG (seeded by seed_everything): a torch.Generator
        # argument cannot be traced and would split the graph at every sampler (8 breaks in Faster R-CNN),
        # leaving CUDA graphs nothing whole to capture. Eager runs reseed their own generator per (seed, step).
        generator = None if self.hparams.compile else self.sampling_generator(images.device)
        graphs = self.hparams.compile in CUDA_GRAPH_MODES
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        losses = self.loss_fn(self._images(images), targets, generator=generator)
        if graphs:  # the outputs live in the CUDA graph's memory, overwritten by the next step's replay
            losses = {k: v.clone() for k, v in losses.items()}
        return losses, images.shape[0]

    def training_step(self, batch: tuple[torch.Tensor, Targets], batch_idx: int) -> torch.Tensor:
        losses, bs = self.training_losses(batch)
        total = sum(losses.values())
        if self.hparams.l1_penalty:
            l1 = self.hparams.l1_penalty * self.l1_norm()
            self.log("train/l1_penalty", l1.detach(), batch_size=bs)
            total = total + l1
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        self.divergence.record(self.global_step, losses, getattr(self.detector, "diagnostics", {}))
        return total

    def l1_norm(self) -> torch.Tensor:
        """``sum |w|`` over the trainable weights with ``ndim > 1`` (one fused ``_foreach_norm``)."""
        if not hasattr(self, "_l1_params"):
            self._l1_params = [p for p in self.detector.parameters() if p.requires_grad and p.ndim > 1]
        return torch.stack(torch._foreach_norm(self._l1_params, 1)).sum()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimiser step, then the EMA's update (:meth:`update_ema`). Here, not in ``on_train_batch_end``:
        Lightning calls that hook after the callbacks' (the checkpoint callback saves in its own), so a mid-epoch
        checkpoint would hold an EMA one update behind that a resumed run never makes up; and under gradient
        accumulation it would count micro-batches, not optimiser steps."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.ema is not None:
            self.update_ema(self.global_step)  # the step just taken (the counter moves after this hook)

    def update_ema(self, step: int) -> None:
        """After optimiser step ``step`` (0-based): one update of the EMA, with its ramped decay. Subclasses change
        the rule (:class:`detkit.lit.semi.SelfTrainingModule`: the teacher's)."""
        self.ema.update(self.detector)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.divergence.flush()  # never write weights that a non-finite loss has already updated

    def on_train_end(self) -> None:
        self.divergence.flush()

    @property
    def inference_model(self) -> torch.nn.Module:
        """The EMA weights when kept, else the trained weights."""
        return self.ema.module if self.ema is not None else self.detector

    def configure_optimizers(self) -> dict:
        opt_cfg = dict(self.hparams.optimizer)
        lr, wd = float(opt_cfg.pop("lr")), float(opt_cfg.pop("weight_decay", 0.0))
        reference = self.hparams.get("lr_reference_batch")
        if reference:  # linear scaling rule (Goyal et al. 2017; detectron2's and mmdetection's auto_scale_lr)
            dm = self.trainer.datamodule
            batch = int(dm.batch_size) * max(1, self.trainer.world_size) \
                * max(1, self.trainer.accumulate_grad_batches)
            scaled = lr * batch / float(reference)
            log.info("learning rate %g scaled linearly to %g for an effective batch of %d (reference batch %d; "
                     "model.lr_reference_batch=null turns scaling off)", lr, scaled, batch, reference)
            lr = scaled
        groups = param_groups(self.detector.named_parameters(), wd, lr, self.lr_mults)
        optimizer = get_class(opt_cfg.pop("_target_"))(groups, lr=lr, **opt_cfg)
        schedule = instantiate(self.hparams.scheduler)
        assert isinstance(schedule, WarmupSchedule)
        scheduler = schedule.build(optimizer, total_training_steps(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- prediction and evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor, targets: Targets) -> list[dict[str, torch.Tensor]]:
        """Detections per image in original image pixels, with original COCO category ids, on the host.

        The padded detections are mapped back to original pixels on the device and copied to the host once per
        batch."""
        dets = self.inference_model.predict(self._images(images))
        boxes = to_original_pixels(dets, targets)
        host = Detections(boxes.float(), dets.scores.float(), dets.labels, dets.valid).cpu()
        image_ids = targets.image_ids.tolist()  # after the copy above has waited: no extra stall
        return [{**det, "category_ids": self.categories.ids_of(det["labels"]), "image_id": image_id}
                for det, image_id in zip(host.to_list(), image_ids)]

    def on_validation_epoch_start(self) -> None:
        self._results = []

    def validation_step(self, batch: tuple[torch.Tensor, Targets], batch_idx: int) -> None:
        images, targets = batch
        for det in self.predict_batch(images, targets):
            self._results += detections_to_results(det["boxes"], det["scores"], det["category_ids"], det["image_id"])

    def test_step(self, batch: tuple[torch.Tensor, Targets], batch_idx: int) -> None:
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
        self.last_results = self.gather_results()
        result = evaluate_coco(gt, self.last_results, backend=self.hparams.eval_backend)
        self.last_eval = result
        self.log_dict({f"{split}/{k}": float(result.stats[k]) for k in STAT_KEYS}, sync_dist=False)
        log.info("%s epoch %d: AP %.4f AP50 %.4f AR100 %.4f", split, self.current_epoch, result.stats["AP"],
                 result.stats["AP50"], result.stats["AR100"])

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")
