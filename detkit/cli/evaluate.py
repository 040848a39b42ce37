"""``detkit-eval``: COCO evaluation of a checkpoint on a dataset, or of a predictions file.

Writes ``OUT/metrics.json`` (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl, per_class with AP,
AP50, precision, recall and F1, and the ``report``: best-F1 confidence and confusion matrix), ``OUT/pr_curves.png``,
``OUT/f1_curves.png``, ``OUT/confusion_matrix.png`` and, in checkpoint mode, ``OUT/predictions.json`` (COCO
results); see :mod:`detkit.eval.report`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from detkit.cli.common import check_torchvision_ops, clean_errors, output_dir
from detkit.eval.coco_eval import EvalResult, PredictionError, evaluate_coco
from detkit.eval.outputs import write_evaluation
from detkit.paths import config_dir
from detkit.run_config import HOLDOUT_GT, load_run_config

log = logging.getLogger("detkit")


def _read_json(path: str, what: str):
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PredictionError(f"{what} file {p} is not valid json ({e})") from e


def evaluate_files(cfg: DictConfig) -> tuple[EvalResult, dict, list]:
    gt = _read_json(cfg.ground_truth, "ground_truth")
    preds = _read_json(cfg.predictions, "predictions")
    if isinstance(preds, dict) and "annotations" in preds:  # a COCO-style file from detkit-predict
        preds = preds["annotations"]
    if not isinstance(preds, list):
        raise PredictionError(f"{cfg.predictions}: expected a COCO results list, got {type(preds).__name__}")
    return evaluate_coco(gt, preds, backend=cfg.backend), gt, preds


def evaluate_checkpoint(cfg: DictConfig, out: Path) -> tuple[EvalResult, dict, list]:
    """Run a checkpoint on ``data.val_*`` and evaluate it on ``device`` (``auto``: CUDA when available).

    The model's categories must be the dataset's (ids and names), unless ``category_mapping=by_name``."""
    from detkit.lit.detection_module import DetectionModule

    check_torchvision_ops(cfg.device)
    module = DetectionModule.from_checkpoint(cfg.checkpoint)
    module.hparams.eval_backend = cfg.backend
    with open_dict(cfg):
        if cfg.data.image_size is None:
            cfg.data.image_size = module.hparams.get("image_size") or 320
    if not cfg.data.val_ann:
        run = Path(cfg.checkpoint).resolve().parent.parent  # RUN/checkpoints/best.ckpt
        hint = ""
        if (run / HOLDOUT_GT).is_file():
            images = OmegaConf.select(load_run_config(run), "data.train_images") \
                if (run / ".hydra" / "config.yaml").is_file() else None
            hint = (f"; {run} was scored on held-out training images (data.holdout_fraction): score them again with "
                    f"data.val_ann={run / HOLDOUT_GT} data.val_images={images or 'its data.train_images'}")
        raise FileNotFoundError(f"checkpoint mode needs data.val_ann=GT.json and data.val_images=DIR{hint}")
    datamodule = instantiate(cfg.data)
    datamodule.setup("validate")
    module.categories = module.categories.mapped_to(datamodule.categories, cfg.category_mapping,
                                                    what=f"checkpoint {cfg.checkpoint}")
    trainer = instantiate(cfg.trainer, accelerator=cfg.device)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    results = module.gather_results()
    return module.last_eval, datamodule.datasets["val"].coco_data, results


def _report_images(cfg: DictConfig) -> Path | None:
    if not cfg.get("report"):
        return None
    if not cfg.data.get("val_images"):
        raise FileNotFoundError("report=true draws the evaluated images: give their folder as data.val_images=DIR")
    return Path(cfg.data.val_images)


@hydra.main(config_path=str(config_dir()), config_name="eval", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> float:
    out = output_dir()
    if cfg.checkpoint:
        result, gt, results = evaluate_checkpoint(cfg, out)
    elif cfg.ground_truth and cfg.predictions:
        result, gt, results = evaluate_files(cfg)
    else:
        raise FileNotFoundError("give checkpoint=CKPT (with data.val_ann/data.val_images) or "
                                "ground_truth=GT.json predictions=PRED.json")
    paths = write_evaluation(out, result, gt, results, {"backend": cfg.backend,
                                                        "device": cfg.device if cfg.checkpoint else None},
                             **cfg.analysis, html_images=_report_images(cfg), title=f"detkit-eval {out}")
    print(result.summary())
    log.info("%s", "\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return float(result.stats["AP"])


if __name__ == "__main__":
    main()
