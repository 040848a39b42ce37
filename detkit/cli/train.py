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
from hydra.utils import instantiate
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from detkit.cli.common import check_torchvision_ops, clean_errors, instantiate_dict, output_dir
from detkit.eval.coco_eval import write_metrics
from detkit.eval.curves import plot_pr_curves
from detkit.models.backbones import EncoderLoadError
from detkit.paths import config_dir

log = logging.getLogger("detkit")


def _resume_path(ckpt_path: str | None, out: Path) -> str | None:
    if ckpt_path != "last":
        return ckpt_path
    last = out / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"ckpt_path=last but {last} does not exist: resume with the same hydra.run.dir")
    return str(last)


def _check_init_choice(cfg: DictConfig) -> None:
    """``init=simclr`` without an encoder file would silently train from random weights: refuse it."""
    choice = HydraConfig.get().runtime.choices.get("init") if HydraConfig.initialized() else None
    if choice == "simclr" and not cfg.model.detector.backbone.get("init"):
        raise EncoderLoadError("init=simclr needs the encoder file: add encoder=PATH/encoder.pt "
                               "(written by detkit-pretrain)")


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
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # validates the dataset: a broken one stops here, before any training
    model = instantiate(cfg.model, categories=datamodule.categories.to_list(), image_size=cfg.data.image_size,
                        seed=cfg.seed, _recursive_=False)
    trainer = instantiate(cfg.trainer, logger=instantiate_dict(cfg.get("logger")),
                          callbacks=instantiate_dict(cfg.get("callbacks")))
    trainer.fit(model, datamodule=datamodule, ckpt_path=_resume_path(cfg.get("ckpt_path"), out))
    best = next((cb.best_model_path for cb in trainer.checkpoint_callbacks if cb.monitor), "")
    trainer.validate(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    result = model.last_eval
    extra = {"epochs": trainer.current_epoch, "global_step": trainer.global_step}
    if cfg.get("test") and datamodule.paths["test"][0]:
        datamodule.setup("test")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        extra["test"] = model.last_eval.to_json()
    metrics_path = write_metrics(out / "metrics.json", result, extra)
    (out / "run.json").write_text(json.dumps({
        "wall_time_s": round(time.time() - start, 1), "checkpoint": best or None,
        "encoder_init": cfg.model.detector.backbone.get("init"), "seed": cfg.seed}, indent=2))
    plot_pr_curves(result, out / "pr_curves.png")
    log.info("%s", result.summary())
    log.info("metrics: %s\nplots: %s\ncheckpoints: %s\nconfig: %s", metrics_path, out / "pr_curves.png",
             out / "checkpoints", out / ".hydra" / "config.yaml")
    return json.loads(metrics_path.read_text())


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> float:
    """Entry point; returns AP (the value an Optuna sweep maximises)."""
    log.debug(OmegaConf.to_yaml(cfg))
    return float(train(cfg)["AP"])


if __name__ == "__main__":
    main()
