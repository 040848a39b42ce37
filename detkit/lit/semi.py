"""Teacher-student self-training on unlabeled images (Unbiased Teacher, Liu et al. 2021), for both detectors.

``detkit-train semi=teacher semi.unlabeled_images=DIR`` trains :class:`SelfTrainingModule`. Every training step
takes a labeled batch and an unlabeled one (:class:`detkit.data.weak_strong.UnlabeledBatch`: a weak and a strong
view of each image, same geometry). For the first ``burn_in`` optimiser steps only the supervised loss is
minimised. After that:

1. the **teacher** (the exponential moving average of the student, :class:`detkit.lit.ema.ModelEMA`; the module's
   EMA, so evaluation, prediction and export use it, as Unbiased Teacher reports its teacher) predicts on the
   weak views, in eval mode and without gradients;
2. its detections scoring above ``score_threshold`` (0.7, Unbiased Teacher's) become **pseudo-labels**: the
   ``max_pseudo_labels`` best per image, padded into :class:`~detkit.structures.Targets` with a valid mask
   (:mod:`detkit.models.detection.pseudo_labels`);
3. the student's own ``loss`` on the strong views against those targets gives the **unsupervised terms**, and the
   step minimises ``supervised + unsup_weight * unsupervised``.

**Which unsupervised terms.** Faster R-CNN: RPN objectness and RoI classification, not box regression (as Unbiased
Teacher). A detection's score says how sure the teacher is of the *class*, not how well the box is placed: a
0.9-scoring box can be off by a third of its size, and regressing to it teaches the student the teacher's
localisation errors, while the classification terms only need the box to overlap the object (an RoI is positive
from IoU 0.5). ``semi.unsup_losses`` adds ``loss_rpn_box_reg``/``loss_box_reg`` for those who want them. YOLO: the
dense head's classification and box terms (``loss_cls``, ``loss_box``), which are computed only at the cells
assigned to a pseudo-box. Its objectness term (``loss_obj``) is left out by default: it is a dense
foreground/background target over *every* cell normalised by the number of positive cells, so on an unlabeled
image each object the teacher missed (scored below the threshold) becomes a negative at all its cells, and a batch
with few pseudo-boxes would weigh those negatives by up to a thousand times; ``semi.unsup_losses`` can add it.

**Soft background** (``semi.soft_background=true``, Faster R-CNN; Soft Teacher, Xu et al. 2021): the student's RoIs
sampled as background on an unlabeled image (IoU below 0.5 with every pseudo-box) include objects the teacher scored
below the threshold. With it, each such RoI's classification loss is weighted by the teacher's own background
probability for that box (the teacher's RoI head on the weak view's features, which the pseudo-labels already
computed: the strong view has the same geometry), so a missed object costs little; foreground RoIs keep weight 1.
This loss call runs eagerly even with ``model.compile`` (a per-step function argument would recompile).

**How much, and for which classes.** The unsupervised weight defaults to 1, not Unbiased Teacher's 4 (set for
180,000-step COCO runs): on a small dataset and a short run, 4 let the pseudo-labelled classes crowd out a class
the teacher never labels (STUDY.md: YOLO lost BCCD's platelets in every seed). The per-class records
(``metrics.json`` ``self_training.per_class``: count, precision, recall, share on another class's object) show
such a class. ``adaptive_threshold`` lowers its threshold in proportion to the teacher's confidence in it
(FreeMatch's self-adaptive thresholds, on a detector's per-class scores); it is off by default because the
pseudo-labels it adds for a class the teacher barely knows are mostly wrong (23% precision in that study).

**Dense pseudo-labels** (``semi.pseudo_labels=dense``, YOLO only; Dense Teacher, Zhou et al. 2022): instead of
thresholded boxes, the student learns the teacher's raw outputs (objectness, class probabilities, boxes) at the cells
the teacher ranks as foreground, as many per image as the labeled batch has positive cells per image
(:mod:`detkit.models.detection.dense_teacher`). No score threshold, no NMS, and a selected cell of a class the
teacher scores low is taught at that score instead of not at all (cells ranked below the count are taught as
background, down-weighted). ``dense_per_class`` selects each class's cells by that class's own score, as many as
the labeled images' positive cells of the class (a moving average), so a rare class the teacher scores below the
others everywhere still gets cells. Its statistics count cells: a selected cell is right when its centre lies in a
ground-truth box of the class it is taught as.

**Teacher updates.** During burn-in the teacher copies the student after every step, so at the end of burn-in it
*is* the burned-in student (Unbiased Teacher initialises it so) and any evaluation during burn-in sees the student.
Afterwards ``teacher = d * teacher + (1 - d) * student`` after every optimiser step with a fixed ``d =
teacher_decay`` (no ramp). Unbiased Teacher uses 0.9996 over 180,000 steps; detkit's default 0.999 (a time
constant of 1,000 steps) suits runs of a few thousand steps on small datasets. The update runs inside
``optimizer_step`` (:meth:`DetectionModule.update_ema`, as every EMA), i.e. before any callback sees the step, so a
mid-epoch checkpoint holds the teacher of that step and a resumed run continues exactly.

**Fixed shapes, no host synchronisation.** The teacher's NMS runs a fixed number of Cluster-NMS iterations
(``teacher_nms_iterations``, on the device path; the RPN does the same), pseudo-labels are a top-k with a mask,
and the statistics (pseudo-labels used, and their precision and recall at IoU ``precision_iou`` against the
unlabeled images' own labels when ``semi.unlabeled_ann`` gives them) accumulate on the device and are read once
per epoch. The burn-in test is on the host's step counter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from detkit.data.weak_strong import UnlabeledBatch
from detkit.errors import UserError
from detkit.lit.detection_module import CUDA_GRAPH_MODES, DetectionModule, plain_config
from detkit.lit.optim import total_training_steps
from detkit.models.detection.boxes import batched_box_iou
from detkit.models.detection.dense_teacher import (DenseSelection, cell_hits, dense_pseudo_losses,
                                                   positives_per_image, select_cells)
from detkit.models.detection.postprocess import PostProcess
from detkit.models.detection.pseudo_labels import (adaptive_thresholds, class_confidence, match_pseudo_labels,
                                                   on_other_class, per_class_counts, pseudo_label_targets,
                                                   score_thresholds)
from detkit.models.detection.yolo import decode_ltrb
from detkit.structures import Targets, as_targets

log = logging.getLogger(__name__)

#: Every loss term each detector returns, and the default unsupervised ones (see the module docstring).
LOSS_TERMS = {"FasterRCNN": ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"),
              "YOLO": ("loss_box", "loss_obj", "loss_cls")}
DEFAULT_UNSUP_LOSSES = {"FasterRCNN": ("loss_objectness", "loss_classifier"), "YOLO": ("loss_cls", "loss_box")}
#: ``semi.pseudo_labels=dense`` (YOLO only): every term, objectness included (its focal weight and the selection by
#: rank make it safe there; see :mod:`detkit.models.detection.dense_teacher`).
DENSE_UNSUP_LOSSES = ("loss_box", "loss_obj", "loss_cls")
PSEUDO_LABEL_KINDS = ("boxes", "dense")


class SelfTrainingError(UserError, ValueError):
    """A ``semi`` setting that cannot work (reported as one line by the entry points)."""


def class_rates(pseudo: int, tp: int, other: int, truth: int, recall: bool = True) -> dict[str, float | None]:
    """Precision (true positives / pseudo-labels), recall (true positives / ground-truth boxes) and ``other_class``
    (the share of pseudo-labels lying on an object of another class), rounded; None where undefined. ``recall=False``
    (dense pseudo-labels, counted in cells, not boxes): no recall."""
    return {"precision": round(tp / pseudo, 4) if pseudo else None,
            "recall": round(tp / truth, 4) if truth and recall else None,
            "other_class": round(other / pseudo, 4) if pseudo else None}


def per_class_totals(epochs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-class records of ``epochs`` (``metrics.json`` ``self_training.epochs``) summed over the run (epochs
    recorded without them, by a version before per-class records, are not in the sums), with the last adaptive
    threshold of each class when there is one."""
    totals: dict[int, dict[str, Any]] = {}  # by class index: two categories may share a name
    for e in epochs:
        for k, row in enumerate(e.get("per_class", [])):
            t = totals.setdefault(k, {"name": row["name"]})
            for key in ("pseudo_labels", "true_positives", "on_other_class", "ground_truth_boxes"):
                if key in row:
                    t[key] = t.get(key, 0) + row[key]
            if "threshold" in row:
                t["last_threshold"] = row["threshold"]  # the adaptive threshold at the end of the run
    cells = any(e.get("unit") == "cells" for e in epochs)
    for t in totals.values():
        if "true_positives" in t:
            t.update(class_rates(t["pseudo_labels"], t["true_positives"], t["on_other_class"],
                                 t["ground_truth_boxes"], recall=not cells))
    return list(totals.values())


@dataclass(frozen=True)
class SelfTraining:
    """The settings of ``semi=teacher`` (``conf/semi/teacher.yaml``; the config node's ``_target_``, so a
    misspelled key is named).

    Args:
        unlabeled_images: folder of unlabeled images (checked before training; unreadable files skipped), or the
            image root of ``unlabeled_ann``.
        unlabeled_ann: optional COCO json of those images: its images are used, and their labels only measure the
            pseudo-labels (precision and recall in ``metrics.json``), never train.
        batch_size: unlabeled images per step (``null``: the labeled batch size).
        burn_in: supervised-only optimiser steps before self-training starts: a count (>= 1) or a fraction of the
            run (< 1), as the learning-rate warm-up.
        pseudo_labels: ``boxes`` (the default, both detectors): the teacher's detections above ``score_threshold``
            after NMS. ``dense`` (YOLO only; Dense Teacher): the teacher's raw per-cell outputs at the cells it ranks
            as foreground, as soft targets (:mod:`detkit.models.detection.dense_teacher`); no threshold, no NMS, and
            its statistics count cells.
        soft_background: Faster R-CNN: weight each background RoI's classification loss on an unlabeled image by
            the teacher's background probability for that box (Soft Teacher; see the module docstring).
        dense_per_class: with ``pseudo_labels=dense``, select each class's cells by that class's score, as many as
            the labeled images' positive cells of the class per image (a moving average over steps, at least one
            once the class was seen: :meth:`SelfTrainingModule.class_cell_counts`;
            :func:`~detkit.models.detection.dense_teacher.select_cells`), instead of the best-scored cells of any
            class. A cell chosen for two classes is one cell, taught as the one scoring it higher.
        score_threshold: a teacher detection above this becomes a pseudo-label: one value, or one per class. With
            ``adaptive_threshold`` one value: the most confident class's threshold.
        adaptive_threshold: class-wise thresholds from the teacher's own scores (FreeMatch-style): class ``c`` gets
            ``score_threshold * confidence[c] / max(confidence)``, where a class's confidence is the mean over images
            of the teacher's highest score for it, averaged over steps with ``adaptive_decay``
            (:func:`~detkit.models.detection.pseudo_labels.adaptive_thresholds`).
        adaptive_floor: the lowest threshold an adaptive class threshold may take.
        adaptive_decay: the moving average of the class confidences (per optimiser step); with ``dense_per_class``
            also of the per-class cell counts.
        max_pseudo_labels: pseudo-labels per image at most (the highest-scoring; the fixed padded size).
        unsup_weight: weight of the unsupervised terms. 1, not Unbiased Teacher's 4 (set for 180,000-step COCO
            runs): on BCCD at 5% of the labels and 300 steps (STUDY.md), at 4 YOLO's pseudo-labels dwindled and its
            rarest class was lost in every seed, and Faster R-CNN lost 0.04 AP50 more than at 1 (seed 0).
        unsup_losses: the detector's loss terms trained on pseudo-labels (``null``: Faster R-CNN
            ``[loss_objectness, loss_classifier]``, YOLO ``[loss_cls, loss_box]``, YOLO with ``pseudo_labels=dense``
            all three).
        teacher_decay: the teacher's EMA decay after burn-in.
        teacher_nms_iterations: Cluster-NMS iterations of the teacher's post-processing (no host read-back).
        precision_iou: IoU at which a pseudo-label counts as correct (class-aware, one-to-one).
        skip_invalid: skip unreadable unlabeled images (named once) instead of refusing the folder.
        views: the weak/strong views (:class:`detkit.data.weak_strong.WeakStrongViews`).
        enabled: ``semi=teacher`` sets it; ``semi=none`` (the default) holds the same settings switched off. (The
            module trains with these settings whatever this says: the switch is read by ``detkit-train``.)
    """

    unlabeled_images: str | None
    unlabeled_ann: str | None = None
    batch_size: int | None = None
    burn_in: float = 0.3
    pseudo_labels: str = "boxes"
    dense_per_class: bool = False
    soft_background: bool = False
    score_threshold: float | Sequence[float] = 0.7
    adaptive_threshold: bool = False
    adaptive_floor: float = 0.1
    adaptive_decay: float = 0.9
    max_pseudo_labels: int = 32
    unsup_weight: float = 1.0
    unsup_losses: Sequence[str] | None = None
    teacher_decay: float = 0.999
    teacher_nms_iterations: int = 4
    precision_iou: float = 0.5
    skip_invalid: bool = True
    views: Any = None
    enabled: bool = False

    def __post_init__(self) -> None:
        if self.enabled and not self.unlabeled_images:
            raise SelfTrainingError("semi=teacher needs the unlabeled images: semi.unlabeled_images=DIR")
        if self.pseudo_labels not in PSEUDO_LABEL_KINDS:
            raise SelfTrainingError(f"semi.pseudo_labels must be one of {list(PSEUDO_LABEL_KINDS)}, got "
                                    f"{self.pseudo_labels!r}")
        if self.dense_per_class and self.pseudo_labels != "dense":
            raise SelfTrainingError("semi.dense_per_class=true selects dense pseudo-labels per class: it needs "
                                    "semi.pseudo_labels=dense")
        if self.pseudo_labels == "dense" and self.soft_background:
            raise SelfTrainingError("semi.soft_background=true weights Faster R-CNN's background RoIs under box "
                                    "pseudo-labels; semi.pseudo_labels=dense (YOLO) already teaches soft targets: "
                                    "drop one of them")
        if self.pseudo_labels == "dense" and self.adaptive_threshold:
            raise SelfTrainingError("semi.pseudo_labels=dense has no score threshold to adapt: drop "
                                    "semi.adaptive_threshold=true (or use semi.pseudo_labels=boxes)")
        if self.burn_in < 0:
            raise SelfTrainingError(f"semi.burn_in must be >= 0 (steps, or a fraction of the run below 1), got "
                                    f"{self.burn_in}")
        if not 0.0 <= self.teacher_decay < 1.0:
            raise SelfTrainingError(f"semi.teacher_decay must lie in [0, 1), got {self.teacher_decay}")
        if self.adaptive_threshold and not isinstance(self.score_threshold, (int, float)):
            raise SelfTrainingError(f"semi.adaptive_threshold=true sets each class's threshold from the teacher's "
                                    f"scores: give semi.score_threshold as one value (the most confident class's), "
                                    f"not {list(self.score_threshold)}")
        if self.adaptive_threshold and self.adaptive_floor > self.score_threshold:
            raise SelfTrainingError(f"semi.adaptive_floor={self.adaptive_floor} is above semi.score_threshold="
                                    f"{self.score_threshold}: every class would get {self.score_threshold} (no "
                                    f"adaptation); give a floor below it")
        if not 0.0 <= self.adaptive_floor <= 1.0 or not 0.0 <= self.adaptive_decay < 1.0:
            raise SelfTrainingError(f"semi.adaptive_floor must lie in [0, 1] and semi.adaptive_decay in [0, 1), got "
                                    f"{self.adaptive_floor} and {self.adaptive_decay}")
        if self.unsup_weight is None:  # a config saved while null meant "the detector's default" (4 / 1)
            raise SelfTrainingError("semi.unsup_weight must be a number: 1 is the default, 4 Unbiased Teacher's (and "
                                    "Faster R-CNN's before 2026-12-01)")
        if self.unsup_weight < 0:
            raise SelfTrainingError(f"semi.unsup_weight must be >= 0, got {self.unsup_weight}")
        if self.max_pseudo_labels < 1:
            raise SelfTrainingError(f"semi.max_pseudo_labels must be >= 1, got {self.max_pseudo_labels}")

    @classmethod
    def from_config(cls, cfg: DictConfig | dict) -> "SelfTraining":
        """From the ``semi`` config node (resolved; ``_target_`` and other ``_`` keys ignored)."""
        plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in plain if not k.startswith("_") and k not in names)
        if unknown:
            raise SelfTrainingError(f"unknown semi settings {unknown}; valid: {sorted(names)}")
        return cls(**{k: v for k, v in plain.items() if k in names})


@contextlib.contextmanager
def fixed_nms_iterations(model: torch.nn.Module, iterations: int) -> Iterator[None]:
    """Run every :class:`PostProcess` of ``model`` (its ``inference`` nodes) with ``iterations`` fixed Cluster-NMS
    iterations (nothing read back to the host) while inside; restored after."""
    posts = [m.inference for m in model.modules() if isinstance(getattr(m, "inference", None), PostProcess)]
    before = [p.fixed_iterations for p in posts]
    for p in posts:
        p.fixed_iterations = iterations
    try:
        yield
    finally:
        for p, value in zip(posts, before):
            p.fixed_iterations = value


class SelfTrainingModule(DetectionModule):
    """:class:`~detkit.lit.detection_module.DetectionModule` plus teacher-student self-training (see the module
    docstring). Takes the module's arguments and ``semi`` (the ``semi`` config node as a dict); the teacher is the
    module's EMA with ``ema_decay = semi.teacher_decay``, so its checkpoints load as plain detector checkpoints
    (``DetectionModule.from_checkpoint`` evaluates, predicts and exports the teacher)."""

    def __init__(self, *args: Any, semi: dict, **kwargs: Any) -> None:
        semi = plain_config(semi)
        self.settings = SelfTraining.from_config(semi)
        if kwargs.get("ema_decay") not in (None, self.settings.teacher_decay):
            log.info("semi=teacher: the EMA is the teacher; its decay is semi.teacher_decay=%g (model.ema_decay=%g "
                     "is not used)", self.settings.teacher_decay, kwargs["ema_decay"])
        kwargs["ema_decay"] = self.settings.teacher_decay
        if kwargs.get("compile") in CUDA_GRAPH_MODES:
            raise SelfTrainingError(f"semi=teacher runs the loss twice per step, which model.compile="
                                    f"{kwargs['compile']} (CUDA graphs) does not support: use model.compile=true")
        super().__init__(*args, **kwargs)
        self.hparams["semi"] = semi
        kind = type(self.detector).__name__
        self.dense = self.settings.pseudo_labels == "dense"
        if self.dense and kind != "YOLO":
            raise SelfTrainingError(f"semi.pseudo_labels=dense trains on a one-stage detector's per-cell outputs "
                                    f"(model=yolo); {kind} takes semi.pseudo_labels=boxes")
        terms = self.settings.unsup_losses
        default = DENSE_UNSUP_LOSSES if self.dense else DEFAULT_UNSUP_LOSSES.get(kind, ())
        self.unsup_losses = tuple(terms) if terms is not None else default
        self.unsup_weight = float(self.settings.unsup_weight)
        known = LOSS_TERMS.get(kind)
        if not self.unsup_losses or (known is not None and not set(self.unsup_losses) <= set(known)):
            raise SelfTrainingError(f"semi.unsup_losses={list(self.unsup_losses)}: {kind}'s loss terms are "
                                    f"{list(known or [])}; give a non-empty subset")
        if self.settings.soft_background and (kind != "FasterRCNN" or "loss_classifier" not in self.unsup_losses):
            raise SelfTrainingError(
                f"semi.soft_background=true weights the RoI classification loss of a two-stage detector "
                f"(model=faster_rcnn, with loss_classifier in semi.unsup_losses); here the detector is {kind} and "
                f"the unsupervised terms are {list(self.unsup_losses)}")
        threshold = self.settings.score_threshold
        self.thresholds = threshold if isinstance(threshold, (int, float)) else \
            score_thresholds(threshold, len(self.categories))
        self.measure = self.settings.unlabeled_ann is not None
        self._burn_in: int | None = int(self.settings.burn_in) if self.settings.burn_in >= 1 or \
            self.settings.burn_in == 0 else None
        # per class [C, 4]: pseudo-labels, true positives, on another class's object, ground-truth boxes; on device
        self._stats: torch.Tensor | None = None
        self._stats_images = 0  # unlabeled images pseudo-labelled since the last record (host)
        self._stats_epoch: int | None = None
        self._pseudo_count: torch.Tensor | None = None  # this step's pseudo-labels (logged)
        self._confidence: torch.Tensor | None = None  # [C] the classes' confidence levels (adaptive thresholds)
        self._cell_counts: torch.Tensor | None = None  # [C] cells per image and class (dense_per_class)
        self.history: list[dict[str, Any]] = []  # one record per epoch (metrics.json "self_training")

    # ---- schedule ---------------------------------------------------------------------------------------------
    @property
    def burn_in_steps(self) -> int:
        """Supervised-only optimiser steps (a fraction of the run is resolved when fitting starts)."""
        if self._burn_in is None:
            if self._trainer is None:
                raise RuntimeError("semi.burn_in as a fraction of the run needs the trainer (or give steps)")
            self._burn_in = int(round(self.settings.burn_in * total_training_steps(self.trainer)))
        return self._burn_in

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.dense:
            log.info("self-training: %d supervised burn-in steps, then dense pseudo-labels (the teacher's outputs at "
                     "the cells it ranks foreground, as many per image as the labeled images' positive cells%s) "
                     "train %s with weight %g; teacher decay %g", self.burn_in_steps,
                     ", per class" if self.settings.dense_per_class else "", list(self.unsup_losses),
                     self.unsup_weight, self.settings.teacher_decay)
            return
        log.info("self-training: %d supervised burn-in steps, then pseudo-labels above %s%s (at most %d per image) "
                 "train %s with weight %g%s; teacher decay %g", self.burn_in_steps, self.settings.score_threshold,
                 " for the most confident class, class-wise thresholds adapted to the teacher's scores" if
                 self.settings.adaptive_threshold else "",
                 self.settings.max_pseudo_labels, list(self.unsup_losses), self.unsup_weight,
                 ", background RoIs weighted by the teacher's background probability" +
                 (" (the unlabeled images' loss runs uncompiled)" if self.hparams.compile else "") if
                 self.settings.soft_background else "", self.settings.teacher_decay)

    # ---- the step ---------------------------------------------------------------------------------------------
    def training_losses(self, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        if not isinstance(batch, dict) or set(batch) != {"labeled", "unlabeled"}:
            raise TypeError("SelfTrainingModule trains on {'labeled': ..., 'unlabeled': ...} batches (the data "
                            "module's loader after add_unlabeled)")
        losses, bs = super().training_losses(batch["labeled"])
        self._pseudo_count = None
        if self.global_step >= self.burn_in_steps:
            if self.dense:
                images, targets = batch["labeled"]
                losses.update(self.dense_unsupervised_losses(batch["unlabeled"], images, targets))
            else:
                losses.update(self.unsupervised_losses(batch["unlabeled"]))
        return losses, bs

    def teacher(self) -> torch.nn.Module:
        """The teacher (the EMA's module), in eval mode: it is never trained, and a ``LightningModule.train()`` call
        must not change how it predicts."""
        teacher = self.ema.module
        if teacher.training:
            teacher.eval()
        return teacher

    def pseudo_labels(self, unlabeled: UnlabeledBatch
                      ) -> tuple[Targets, Callable[[torch.Tensor], torch.Tensor] | None]:
        """The teacher's pseudo-labels for the weak views (:class:`~detkit.structures.Targets`, fixed shape), and with
        ``soft_background`` the teacher's background probability of boxes on those images (``[B, S, 4]`` xyxy ->
        ``[B, S]``, no gradient; :meth:`RoIHeads.background_probability` on the features of this same forward)."""
        teacher = self.teacher()
        weak = self._images(unlabeled.weak)
        background = None
        with torch.no_grad(), fixed_nms_iterations(teacher, self.settings.teacher_nms_iterations):
            if self.settings.soft_background:
                dets, features = teacher.predict_with_features(weak)

                def background(boxes: torch.Tensor) -> torch.Tensor:
                    with torch.no_grad():
                        return teacher.roi_heads.background_probability(features, boxes)
            else:
                dets = teacher.predict(weak)
        thresholds = self.thresholds
        if self.settings.adaptive_threshold:
            thresholds = self.adapt_thresholds(dets)
        pseudo = pseudo_label_targets(dets, thresholds, self.settings.max_pseudo_labels, like=unlabeled.targets)
        return pseudo, background

    def adapt_thresholds(self, dets) -> torch.Tensor:
        """Moves the classes' confidence levels toward this batch's (:func:`class_confidence`; the first batch sets
        them) and returns the class-wise thresholds ``[C]`` they give (on the device, no read-back)."""
        level = class_confidence(dets, len(self.categories))
        if self._trainer is not None and self.trainer.world_size > 1:
            # one level for all processes (a collective, not a host read-back): every process then keeps the same
            # thresholds, and the checkpoint's (rank 0's) confidences are every process's when a run resumes
            level = self.trainer.strategy.reduce(level, reduce_op="mean")
        if self._confidence is None:
            self._confidence = level
        else:
            self._confidence = torch.lerp(level, self._confidence.to(level.device), self.settings.adaptive_decay)
        return self.class_thresholds()

    def class_thresholds(self) -> torch.Tensor:
        """The adaptive class-wise thresholds ``[C]`` now."""
        return adaptive_thresholds(self._confidence, float(self.settings.score_threshold), self.settings.adaptive_floor)

    def unsupervised_losses(self, unlabeled: UnlabeledBatch) -> dict[str, torch.Tensor]:
        """``{"unsup_<term>": unsup_weight * term}`` for the student on the strong views against the teacher's
        pseudo-labels from the weak views; records the pseudo-labels' statistics."""
        pseudo, background = self.pseudo_labels(unlabeled)
        generator = None if self.hparams.compile else self._generators.get(str(unlabeled.strong.device))
        if background is None:
            raw = self.loss_fn(self._images(unlabeled.strong), pseudo, generator=generator)
        else:  # eager: a new function argument every step would make a compiled loss recompile
            raw = self.detector.loss(self._images(unlabeled.strong), pseudo, generator=generator,
                                     background_weights=background)
        self._record(pseudo, unlabeled)
        w = self.unsup_weight
        return {f"unsup_{k}": w * raw[k] for k in self.unsup_losses}

    def dense_unsupervised_losses(self, unlabeled: UnlabeledBatch, labeled_images: torch.Tensor,
                                  labeled_targets: Any) -> dict[str, torch.Tensor]:
        """``semi.pseudo_labels=dense`` (YOLO): ``{"unsup_<term>": unsup_weight * term}`` for the student on the
        strong views against the teacher's raw outputs on the weak views, at the cells the teacher ranks foreground,
        as many per image as the labeled batch has positive cells per image (per class with ``dense_per_class``:
        :meth:`class_cell_counts`; :mod:`detkit.models.detection.dense_teacher`); records the selected cells'
        statistics."""
        student, teacher = self.detector, self.teacher()
        if tuple(labeled_images.shape[-2:]) != tuple(unlabeled.weak.shape[-2:]):  # host-side shapes: no sync
            raise SelfTrainingError(f"semi.pseudo_labels=dense counts the labeled images' positive cells on the "
                                    f"unlabeled images' grid, so both must have one size: labeled "
                                    f"{tuple(labeled_images.shape[-2:])}, unlabeled {tuple(unlabeled.weak.shape[-2:])} "
                                    f"(semi.views.size must be data.image_size)")
        with torch.no_grad():
            t_raw, grid = teacher.forward_raw(self._images(unlabeled.weak))
            t_boxes = decode_ltrb(grid.points, grid.strides, t_raw[..., :4])
            labeled = as_targets(labeled_targets, t_raw.device)
            assigned = student.assigner(grid.points, grid.strides, grid.level, labeled.boxes, labeled.valid)
            if self.settings.dense_per_class:
                count = self.class_cell_counts(positives_per_image(assigned, labeled.labels, len(self.categories)))
            else:
                count = positives_per_image(assigned)
            selection = select_cells(t_raw, count)
        s_raw, s_grid = student.forward_raw(self._images(unlabeled.strong))
        s_boxes = decode_ltrb(s_grid.points, s_grid.strides, s_raw[..., :4])
        raw = dense_pseudo_losses(s_raw, t_raw, s_boxes, t_boxes, selection, student.box_loss, student.weights)
        self._record_cells(selection, grid.points, unlabeled)
        # a labeled batch without objects (or, per class, no class seen yet) gives a count of 0: nothing selected, and
        # every cell of the unlabeled images would be taught as background; that step's unsupervised terms are
        # switched off (a multiply, no sync)
        w = self.unsup_weight * selection.selected.any().float()
        return {f"unsup_{k}": w * raw[k] for k in self.unsup_losses}

    def class_cell_counts(self, level: torch.Tensor) -> torch.Tensor:
        """``semi.dense_per_class``: the cells per image to select for each class ``[C]``, from this step's labeled
        positive cells per image and class ``level`` ``[C]``: a moving average over steps (``adaptive_decay``; the
        first step sets it; averaged over processes under DDP and kept in checkpoints), so a class missing from one
        small labeled batch keeps its share; a class once seen gets at least one cell per image (a count below 0.5
        would round to none)."""
        if self._trainer is not None and self.trainer.world_size > 1:
            level = self.trainer.strategy.reduce(level, reduce_op="mean")  # a collective, not a read-back
        if self._cell_counts is None:
            self._cell_counts = level
        else:
            self._cell_counts = torch.lerp(level, self._cell_counts.to(level.device), self.settings.adaptive_decay)
        return torch.where(self._cell_counts > 0, self._cell_counts.clamp(min=1.0), self._cell_counts)

    def _record_cells(self, selection: DenseSelection, points: torch.Tensor, unlabeled: UnlabeledBatch) -> None:
        """Dense pseudo-labels' statistics, in cells: selected cells per class (the class each is taught as:
        :class:`~detkit.models.detection.dense_teacher.DenseSelection`), those inside a ground-truth box of that
        class, and those inside only another class's boxes."""
        truth, c = unlabeled.targets, len(self.categories)
        count = per_class_counts(selection.label, selection.selected, c)
        if self.measure:
            same, other_only = cell_hits(points, selection, truth)
            tp, other = per_class_counts(selection.label, same, c), per_class_counts(selection.label, other_only, c)
        else:
            tp = other = torch.zeros_like(count)
        self._accumulate(count, tp, other, truth, int(unlabeled.weak.shape[0]))

    def _record(self, pseudo, unlabeled: UnlabeledBatch) -> None:
        truth = unlabeled.targets
        c = len(self.categories)
        count = per_class_counts(pseudo.labels, pseudo.valid, c)
        if self.measure:
            iou, at = batched_box_iou(pseudo.boxes, truth.boxes), self.settings.precision_iou  # [B, P, G], once
            tp = per_class_counts(pseudo.labels, match_pseudo_labels(pseudo, truth, at, iou=iou), c)
            other = per_class_counts(pseudo.labels, on_other_class(pseudo, truth, at, iou=iou), c)
        else:
            tp = other = torch.zeros_like(count)
        self._accumulate(count, tp, other, truth, int(unlabeled.weak.shape[0]))

    def _accumulate(self, count: torch.Tensor, tp: torch.Tensor, other: torch.Tensor, truth, images: int) -> None:
        """Add one step's per-class counts ``[C]`` to the epoch's table (on the device)."""
        if self._stats_epoch is not None and self._stats_epoch != self.current_epoch:
            self.flush_statistics()  # an epoch whose end was not seen by this process (resumed)
        self._stats_epoch = self.current_epoch
        c = len(self.categories)
        step = torch.stack([count, tp, other, per_class_counts(truth.labels, truth.valid, c)], dim=1)  # [C, 4]
        self._stats = step if self._stats is None else self._stats.to(step.device) + step
        self._stats_images += images
        self._pseudo_count = count.sum()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        total = super().training_step(batch, batch_idx)
        if self._pseudo_count is not None:
            b = batch["unlabeled"].weak.shape[0]
            self.log("train/pseudo_labels_per_image", self._pseudo_count.float() / b, batch_size=b)
        return total

    # ---- the teacher ------------------------------------------------------------------------------------------
    def update_teacher(self, step: int) -> None:
        """After optimiser step ``step``: the teacher copies the student during burn-in (so it is the burned-in
        student when self-training starts), then moves toward it with ``teacher_decay``."""
        decay = 0.0 if step < self.burn_in_steps else self.settings.teacher_decay
        self.ema.update(self.detector, decay=decay)

    def update_ema(self, step: int) -> None:
        self.update_teacher(step)  # DetectionModule.optimizer_step calls this after every optimiser step

    # ---- statistics -------------------------------------------------------------------------------------------
    def flush_statistics(self, log_metrics: bool = False) -> None:
        """Close the statistics of the epoch they were gathered in: one record in :attr:`history` (summed over
        processes under DDP; one read-back per epoch)."""
        epoch = self._stats_epoch if self._stats_epoch is not None else self.current_epoch
        c = len(self.categories)
        stats = self._stats if self._stats is not None else torch.zeros(c, 4, dtype=torch.int64, device=self.device)
        both = torch.cat([stats.to(self.device).double().flatten(),
                          torch.tensor([float(self._stats_images)], dtype=torch.float64, device=self.device)])
        if self._trainer is not None and self.trainer.world_size > 1:
            both = self.trainer.strategy.reduce(both, reduce_op="sum")
        adaptive = self._confidence is not None and self.settings.adaptive_threshold
        # two read-backs per epoch: the counts, and the thresholds (the same on every process: their levels are
        # averaged over processes at every step, adapt_thresholds)
        values = [int(v) for v in both.tolist()]
        thresholds = self.class_thresholds().tolist() if adaptive else None
        table, images = [values[4 * k: 4 * k + 4] for k in range(c)], values[-1]
        count, tp, other, truth = (sum(row[j] for row in table) for j in range(4))
        record: dict[str, Any] = {"epoch": int(epoch), "unlabeled_images": images, "pseudo_labels": count,
                                  "pseudo_labels_per_image": round(count / images, 4) if images else 0.0}
        if self.dense:
            record["unit"] = "cells"
        if self.measure:
            record.update(class_rates(count, tp, other, truth, recall=not self.dense), ground_truth_boxes=truth)
        per_class = []
        for name, (n, t, o, g) in zip(self.categories.names, table):
            row: dict[str, Any] = {"name": name, "pseudo_labels": n}
            if self.measure:
                row.update(true_positives=t, on_other_class=o, ground_truth_boxes=g)
                row.update(class_rates(n, t, o, g, recall=not self.dense))
            if thresholds is not None:
                row["threshold"] = round(thresholds[len(per_class)], 4)
            per_class.append(row)
        record["per_class"] = per_class
        if images or not any(r["epoch"] == record["epoch"] for r in self.history):
            self.history = [r for r in self.history if r["epoch"] != record["epoch"]] + [record]
        self._stats, self._stats_images, self._stats_epoch = None, 0, None
        if log_metrics and self._trainer is not None:
            metrics = {"semi/pseudo_labels_per_image": float(record["pseudo_labels_per_image"])}
            if self.measure and count:
                metrics["semi/precision"] = float(record["precision"])
            self.log_dict(metrics, sync_dist=False, rank_zero_only=True)

    def on_train_epoch_end(self) -> None:
        self.flush_statistics(log_metrics=True)

    def summary(self) -> dict[str, Any]:
        """``metrics.json``'s ``self_training``: the settings in short and one record per epoch (unlabeled images
        pseudo-labelled, pseudo-labels used, and with ``unlabeled_ann`` their precision, recall and the share lying on
        an object of another class, in total and per class under ``per_class``)."""
        s = self.settings
        boxes = not self.dense  # the threshold, the cap and the IoU apply to box pseudo-labels only
        return {"burn_in_steps": self.burn_in_steps, "pseudo_labels": s.pseudo_labels,
                "dense_per_class": s.dense_per_class if self.dense else None,
                "soft_background": s.soft_background,
                "unit": "boxes" if boxes else "cells", "score_threshold": s.score_threshold if boxes else None,
                "adaptive_threshold": s.adaptive_threshold,
                "max_pseudo_labels": s.max_pseudo_labels if boxes else None, "unsup_weight": self.unsup_weight,
                "unsup_losses": list(self.unsup_losses), "teacher_decay": s.teacher_decay,
                "precision_iou": s.precision_iou if self.measure and boxes else None,
                "per_class": per_class_totals(self.history), "epochs": list(self.history)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["self_training"] = {
            "history": list(self.history), "images": self._stats_images, "epoch": self._stats_epoch,
            "stats": self._stats.detach().cpu() if self._stats is not None else None,
            "confidence": self._confidence.detach().cpu() if self._confidence is not None else None,
            "cell_counts": self._cell_counts.detach().cpu() if self._cell_counts is not None else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("self_training")
        fitting = self._trainer is None or self.trainer.state.fn == "fit"  # not the weights validate() loads
        if state and fitting:
            self.history = list(state["history"])
            self._stats_images, self._stats_epoch, self._stats = state["images"], state["epoch"], state["stats"]
            self._confidence = state.get("confidence")
            self._cell_counts = state.get("cell_counts")
            if self._trainer is not None and self.trainer.global_rank != 0:
                # the checkpoint holds rank 0's part of the unfinished epoch: restored on every process, the
                # epoch's sum over processes would count it world_size times (the others' parts are not saved)
                self._stats, self._stats_images = None, 0
            if self._stats is not None and self._stats.dim() != 2:  # totals only (saved before per-class records)
                log.warning("self-training: this checkpoint's statistics of the unfinished epoch %s are totals, "
                            "not per class; that epoch's record starts again from here", self._stats_epoch)
                self._stats, self._stats_images = None, 0
