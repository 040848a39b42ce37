"""``detkit-train``: fine-tune a detector (optionally after SimCLR pretraining) and evaluate it.

  detkit-train model=faster_rcnn|yolo data.train_ann=A.json data.train_images=DIR data.val_ann=B.json \
      data.val_images=DIR [model.detector.backbone.init=ENCODER.pt] [trainer.max_epochs=N] [hydra.run.dir=OUT]

Writes into the run directory: ``.hydra/config.yaml`` (resolved config), ``checkpoints/{best,last}.ckpt``,
``metrics.json`` (12 COCO stats + per_class; identical for two runs with the same seed), ``run.json`` (wall time,
checkpoint and encoder paths), ``pr_curves.png`` and CSV logs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import DictConfig, OmegaConf, open_dict

from detkit.cli.common import check_torchvision_ops, clean_errors, instantiate_dict, output_dir
from detkit.data.box_stats import MIN_SIZE, box_sizes, choose_image_size, letterboxed_boxes
from detkit.data.transforms import DetectionTransform
from detkit.errors import USER_ERRORS, UserError
from detkit.eval.outputs import write_evaluation
from detkit.lit.optim import plot_lr_schedule, total_training_steps
from detkit.models.backbones import EncoderLoadError
from detkit.models.detection.anchor_fit import decide_anchors, size_range_report
from detkit.paths import config_dir
from detkit.run_config import HOLDOUT_GT

log = logging.getLogger("detkit")


def _resume_path(ckpt_path: str | None, out: Path) -> str | None:
    if ckpt_path != "last":
        return ckpt_path
    last = out / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"ckpt_path=last but {last} does not exist: resume with the same hydra.run.dir")
    return str(last)


class ResumeMismatchError(UserError, ValueError):
    """The checkpoint to resume from does not fit the model the config builds now: other parameter shapes, or other
    optimiser parameter groups."""


#: Settings whose values a resumed run takes from the checkpoint whatever the config says now: the optimiser's saved
#: state restores every group's rate (the schedule's shape is not saved and follows the config).
_RATE_SETTINGS = ("optimizer", "backbone_lr_mult", "head_lr_mult", "lr_mults", "lr_reference_batch")


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def _differences(saved: object, now: object, prefix: str) -> list[str]:
    """``"prefix.key: <saved> in the checkpoint, <now> now"`` for every leaf of two nested settings that differs
    (``backbone.init``, the encoder file, excepted)."""
    old, new = _flat(saved), _flat(now)
    return [f"{'.'.join(p for p in (prefix, k) if p)}: {old.get(k, '(absent)')!r} in the checkpoint, "
            f"{new.get(k, '(absent)')!r} now"
            for k in sorted(old.keys() | new.keys())
            if old.get(k, "(absent)") != new.get(k, "(absent)") and not k.endswith("backbone.init")]


def _load_for_check(path: str) -> dict | None:
    """The checkpoint's dictionary with its tensors memory-mapped (shapes only are read), or ``None`` where this
    check cannot read it (a remote or non-file path, an old format): Lightning then loads it and reports."""
    import torch

    if not Path(path).is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not this check's to report: Lightning's own load says what is wrong
        log.debug("resume check skipped: %s could not be read with mmap", path, exc_info=True)
        return None


def check_resume(model: L.LightningModule, ckpt_path: str | None) -> None:
    """Before ``trainer.fit(..., ckpt_path=...)``: refuse a checkpoint whose weights or optimiser groups do not fit
    the model the current config builds, naming the parameters, categories and settings that differ (instead of
    Lightning's size-mismatch traceback), and warn about learning-rate values that changed, which a resumed run does
    not apply (the optimiser's saved state carries the old rates)."""
    if not ckpt_path:
        return
    ckpt = _load_for_check(str(ckpt_path))
    if ckpt is None:
        return
    import torch

    from detkit.lit.optim import param_groups

    hp = dict(ckpt.get("hyper_parameters", {}))
    if "detector" in hp:  # saved before head_lr_mult existed (2026-12-01): those runs trained the head at 1.0
        hp.setdefault("head_lr_mult", 1.0)
    saved = {k: tuple(v.shape) for k, v in ckpt.get("state_dict", {}).items() if isinstance(v, torch.Tensor)}
    now = {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    differ = sorted(k for k in saved.keys() & now.keys() if saved[k] != now[k])
    where = f"cannot resume from {ckpt_path}"
    if differ:
        changed = _differences(hp.get("detector", {}), dict(model.hparams.get("detector", {})), "model.detector")
        if "categories" in hp and hp["categories"] != model.hparams.get("categories"):
            changed.insert(0, f"the checkpoint has {len(hp['categories'])} categories, this data "
                              f"{len(model.hparams.get('categories') or [])}")
        shapes = "; ".join(f"{k} {list(saved[k])} vs {list(now[k])}" for k in differ[:4])
        raise ResumeMismatchError(
            f"{where}: {len(differ)} parameter(s) have other shapes than the model this config builds ({shapes}"
            f"{'; ...' if len(differ) > 4 else ''}). "
            + (f"What differs: {'; '.join(changed[:6])}{'; ...' if len(changed) > 6 else ''}. " if changed else "")
            + "Resume with the checkpoint's settings, given as overrides.")
    states = ckpt.get("optimizer_states") or []
    opt_cfg = dict(model.hparams.get("optimizer") or {})
    if states and "param_groups" in states[0] and hasattr(model, "lr_mults") and hasattr(model, "detector"):
        groups = param_groups(model.detector.named_parameters(), float(opt_cfg.get("weight_decay", 0.0)), 1.0,
                              model.lr_mults)
        # the groups' sizes, not only their number: the same count can split the parameters differently
        sizes_now = sorted(len(g["params"]) for g in groups)
        sizes_saved = sorted(len(g.get("params", [])) for g in states[0]["param_groups"])
        if sizes_now != sizes_saved:
            changed = [d for key in ("backbone_lr_mult", "head_lr_mult", "lr_mults", "freeze")
                       for d in _differences(hp.get(key), model.hparams.get(key), f"model.{key}")]
            raise ResumeMismatchError(
                f"{where}: its optimiser has {len(sizes_saved)} parameter groups of {sizes_saved} parameters, this "
                f"config makes {len(sizes_now)} of {sizes_now}" + (f" ({'; '.join(changed[:6])})" if changed else "")
                + ". Resume with the checkpoint's settings, given as overrides.")
    changed = [d for key in _RATE_SETTINGS if key in hp
               for d in _differences(hp[key], model.hparams.get(key), f"model.{key}")]
    if changed:
        log.warning("resuming from %s: %s; the resumed run keeps the checkpoint's learning rates", ckpt_path,
                    "; ".join(changed[:6]))


def _check_init_choice(cfg: DictConfig) -> None:
    """``init=simclr`` or ``init=densecl`` without an encoder file would silently train from random weights: refuse
    it."""
    choice = HydraConfig.get().runtime.choices.get("init") if HydraConfig.initialized() else None
    if choice in ("simclr", "densecl") and not cfg.model.detector.backbone.get("init"):
        job = "" if choice == "simclr" else " pretrain_job=densecl"
        raise EncoderLoadError(f"init={choice} needs the encoder file: add encoder=PATH/encoder.pt "
                               f"(written by detkit-pretrain{job})")


def build_datamodule(cfg: DictConfig):
    """Instantiate ``cfg.data`` and build (validate) the training and validation splits; a broken dataset stops here,
    before any training starts. ``data.image_size: null`` -> a size chosen from the training split's boxes
    (:func:`choose_image_size`) without the held-out images (``data.holdout_fraction``: they are for choosing
    settings, so they decide nothing) and before the label budget (so every ``data.train_fraction`` and seed of a
    study trains at one size), recorded in ``cfg`` and set in the splits' transforms."""
    auto = cfg.data.get("image_size") is None and bool(cfg.data.get("train_ann"))
    if auto:
        with open_dict(cfg):
            cfg.data.image_size = MIN_SIZE  # provisional: the splits are built once, then given the chosen size
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    if auto:
        size = choose_image_size(datamodule.datasets["train"].pool_data)
        cfg.data.image_size = size
        given = {"train": cfg.data.get("train_transform"), "eval": cfg.data.get("eval_transform")}
        datamodule.set_transforms(*(instantiate(t) if t is not None else DetectionTransform(size, train=k == "train")
                                    for k, t in given.items()))
        log.info("data.image_size not set: training at %d px, chosen from the training boxes (the smallest objects "
                 "keep >= 8 px; see detkit/data/box_stats.py)", size)
    return datamodule


def fit_priors(cfg: DictConfig, data: dict) -> dict:
    """Measure the detector's priors against the training boxes ``data`` (COCO dict) at the training size and log
    it; for the RPN, record in ``cfg`` the anchors :func:`~detkit.models.detection.anchor_fit.decide_anchors` chose
    under ``anchor_generator.fit`` (so the checkpoint and the saved config hold what was trained). Returns the
    report for ``run.json``."""
    size, det, report = int(cfg.data.image_size), cfg.model.detector, {}
    backbone = det.backbone  # the backbone class computes its strides from these settings (Backbone.strides_for)
    strides = list(get_class(backbone._target_).strides_for(
        **{k: backbone[k] for k in ("levels", "neck", "extra_pool", "small_stem") if k in backbone}).values())
    boxes, wh = letterboxed_boxes(data, size), box_sizes(data, size)
    if "rpn" in det:
        gen = det.rpn.anchor_generator
        configured = instantiate(gen)
        fg_iou = float(det.rpn.get("fg_iou_thresh", 0.7))
        # k-means from a fixed seed: the anchors are a property of the data, the same for every seed of a sweep
        decision = decide_anchors(configured, boxes, wh, strides, size, fg_iou=fg_iou)
        log.info("RPN anchors %s: %s", configured.sizes, decision.configured)
        log.info("%s", decision)
        report["anchors"] = decision.report(configured.sizes, configured.aspect_ratios)
        if decision.fitted:
            with open_dict(cfg):
                gen.sizes, gen.aspect_ratios = decision.sizes, decision.aspect_ratios
    if det.get("assigner") is not None and det.assigner.get("size_ranges") is not None:
        report["size_ranges"] = size_range_report(wh, det.assigner.size_ranges, strides)
        log.info("YOLO size ranges (longer half-side) against the training boxes: %s", report["size_ranges"])
    return report


def plot_lr_only(cfg: DictConfig, datamodule, out: Path) -> dict:
    """``plot_lr=true``: write the run's learning-rate curve (``lr_schedule.png`` / ``.csv``) and stop before
    training."""
    trainer = instantiate(cfg.trainer, logger=False, callbacks=None)
    total = total_training_steps(trainer, datamodule)
    schedule = instantiate(cfg.model.scheduler)
    lr = float(cfg.model.optimizer.lr)
    path = out / "lr_schedule.png"
    values = plot_lr_schedule(schedule, total, lr, path, f"{cfg.model.optimizer._target_.split('.')[-1]} lr {lr:g}, "
                              f"{schedule.kind} schedule, {total} steps")
    log.info("learning-rate curve (%d steps, peak %g, last %g): %s and %s; nothing trained (plot_lr=true)", total,
             max(values), values[-1], path, path.with_suffix(".csv"))
    return {"lr_schedule": str(path), "steps": total}


def stop_reason(trainer) -> dict:
    """Why training ended: early stopping (its epoch and message) or the configured length."""
    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping) and cb.stopping_reason_message:
            return {"by": "early_stopping", "epoch": int(cb.stopped_epoch), "reason": cb.stopping_reason_message}
    return {"by": "schedule", "epoch": int(trainer.current_epoch), "reason": "reached trainer.max_epochs / max_steps"}


def add_unlabeled_images(cfg: DictConfig, datamodule) -> dict:
    """``semi=teacher``: check the unlabeled images and add them to the training loader; returns what the model's
    instantiation needs (its self-training class and settings; nothing without ``semi``)."""
    if not cfg.get("semi") or not cfg.semi.get("enabled", True):
        return {}
    from detkit.data.weak_strong import UnlabeledPairs, unlabeled_collate
    from detkit.lit.semi import SelfTraining

    settings = SelfTraining.from_config(cfg.semi)
    held_out = [r.path for r in datamodule.datasets["val"].records] if datamodule.holdout_fraction else []
    pairs = UnlabeledPairs(settings.unlabeled_images, instantiate(cfg.semi.views), settings.unlabeled_ann,
                           datamodule.categories, settings.skip_invalid, exclude=held_out)
    datamodule.add_unlabeled(pairs, unlabeled_collate, settings.batch_size)
    return {"_target_": "detkit.lit.semi.SelfTrainingModule", "semi": OmegaConf.to_container(cfg.semi, resolve=True)}


def train(cfg: DictConfig, out: Path | None = None) -> dict:
    """Run one training job from a composed config; return the metrics written to ``out/metrics.json``
    (``out`` defaults to the Hydra run directory)."""
    out = Path(out) if out is not None else output_dir()
    check_torchvision_ops(cfg.trainer.get("accelerator", "cpu"))
    L.seed_everything(cfg.seed, workers=True)
    start = time.time()
    if cfg.get("pretrain"):
        from detkit.cli.pretrain import pretrain

        encoder = pretrain(cfg.pretrain, out / "pretrain")
        with open_dict(cfg):
            cfg.model.detector.backbone.init = str(encoder)
        L.seed_everything(cfg.seed, workers=True)
    _check_init_choice(cfg)
    datamodule = build_datamodule(cfg)  # validates the dataset: a broken one stops here, before any training
    priors = fit_priors(cfg, datamodule.datasets["train"].coco_data)
    saved_config = out / ".hydra" / "config.yaml"
    if saved_config.is_file():  # the run's config records what was trained (fitted anchors, chosen size)
        OmegaConf.save(cfg, saved_config)
    if cfg.get("plot_lr"):
        return plot_lr_only(cfg, datamodule, out)
    semi = add_unlabeled_images(cfg, datamodule)
    try:
        model = instantiate(cfg.model, categories=datamodule.categories.to_list(), image_size=cfg.data.image_size,
                            seed=cfg.seed, _recursive_=False, **semi)
    except InstantiationException as e:  # Hydra wraps what the module raised: report a user error in its own words
        if isinstance(e.__cause__, USER_ERRORS):
            raise e.__cause__ from None
        raise
    trainer = instantiate(cfg.trainer, logger=instantiate_dict(cfg.get("logger")),
                          callbacks=instantiate_dict(cfg.get("callbacks")))
    resume = _resume_path(cfg.get("ckpt_path"), out)
    check_resume(model, resume)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    self_training = model.summary() if semi else None  # before validate() loads the best checkpoint's weights
    best = next((cb.best_model_path for cb in trainer.checkpoint_callbacks if cb.monitor), "")
    trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    result, val_results = model.last_eval, model.last_results
    extra = {"epochs": trainer.current_epoch, "global_step": trainer.global_step,
             "evaluated_on": "holdout" if getattr(datamodule, "holdout_fraction", 0) else "val"}
    if self_training is not None:
        extra["self_training"] = self_training
    if cfg.get("test") and datamodule.paths["test"][0]:
        datamodule.setup("test")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        extra["test"] = model.last_eval.to_json()
    if trainer.global_rank != 0:  # under DDP every process has evaluated the gathered results; one writes the files
        return result.to_json()
    if extra["evaluated_on"] == "holdout":  # the scored images' ground truth, for detkit-report
        (out / HOLDOUT_GT).write_text(json.dumps(datamodule.datasets["val"].coco_data))
    val_images = Path(datamodule.paths["val"][1]) if cfg.get("report") else None
    paths = write_evaluation(out, result, datamodule.datasets["val"].coco_data, val_results, extra,
                             **cfg.analysis, html_images=val_images, title=f"detkit-train {out}")
    (out / "run.json").write_text(json.dumps({
        "wall_time_s": round(time.time() - start, 1), "checkpoint": best or None,
        "encoder_init": cfg.model.detector.backbone.get("init"), "seed": cfg.seed,
        "image_size": cfg.data.image_size, "priors": priors, "stop": stop_reason(trainer)}, indent=2))
    log.info("%s", result.summary())
    log.info("%s\ncheckpoints: %s\nconfig: %s", "\n".join(f"{kind}: {path}" for kind, path in paths.items()),
             out / "checkpoints", out / ".hydra" / "config.yaml")
    return json.loads(paths["metrics"].read_text())


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> float:
    """Entry point; returns AP (the value an Optuna sweep maximises)."""
    log.debug(OmegaConf.to_yaml(cfg))
    return float(train(cfg).get("AP", float("nan")))


if __name__ == "__main__":
    main()
