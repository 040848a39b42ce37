"""``detkit-pretrain data.images=DIR [pretrain_job=densecl] [trainer.max_epochs=N] [hydra.run.dir=OUT]``: SimCLR
(default) or DenseCL pretraining.

Writes ``OUT/encoder.pt`` (the encoder file ``model.detector.backbone.init`` takes), ``OUT/checkpoints/last.ckpt`` and
``OUT/pretrain_metrics.json`` (final loss, kNN accuracy when a monitor set is configured, wall time, images/s, and
under ``input_check`` the images used and the unreadable files skipped, by name with the reason).
``+ckpt_path=OUT/checkpoints/last.ckpt`` (saved at the end of every epoch) resumes a stopped run with the same
command; its wall time and images/s then cover the epochs trained after resuming (``epochs_this_run``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from detkit.cli.common import USER_ERRORS, check_torchvision_ops, clean_errors, output_dir
from detkit.models.backbones import save_encoder
from detkit.paths import config_dir

log = logging.getLogger("detkit")


class _StartEpoch(L.Callback):
    """Records the epoch training starts from (after a checkpoint is restored), so a resumed run's images/s covers
    only the epochs it trained itself."""

    epoch = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch = trainer.current_epoch


def pretrain(cfg: DictConfig, out: Path) -> Path:
    """Run the pretraining config node (SimCLR or DenseCL, as ``cfg.model`` says); return the path of the written
    encoder file (the same format for both; ``meta["method"]`` names the method)."""
    out.mkdir(parents=True, exist_ok=True)
    check_torchvision_ops(cfg.trainer.get("accelerator", "cpu"))
    L.seed_everything(cfg.get("seed", 0), workers=True)
    try:
        datamodule = instantiate(cfg.data)  # checks the images (and kNN folders) before anything is trained
    except InstantiationException as e:  # Hydra wraps what the data module raised: report the check's own words
        if isinstance(e.__cause__, USER_ERRORS):
            raise e.__cause__ from None
        raise
    module = instantiate(cfg.model)
    # last.ckpt after every epoch. (save_last=True with save_top_k=0 writes nothing at a training-epoch end when
    # there is no validation loop: Lightning only copies "last" from a top-k save.)
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", save_top_k=1, monitor=None,
                                 save_on_train_epoch_end=True, enable_version_counter=False)
    started = _StartEpoch()
    extra = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]  # +callbacks.NAME._target_=...
    trainer = instantiate(cfg.trainer, default_root_dir=str(out), callbacks=[checkpoint, started, *extra],
                          logger=L.pytorch.loggers.CSVLogger(str(out), name="logs", version=""))
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    wall = time.time() - start
    ran = trainer.current_epoch - started.epoch  # a resumed run times only the epochs it trained itself
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(epochs=trainer.current_epoch, epochs_this_run=ran, wall_time_s=round(wall, 1),
                   images_per_s=round(len(datamodule.dataset) * ran / max(wall, 1e-9), 1))
    encoder = save_encoder(module.encoder, out / "encoder.pt", meta={"method": getattr(module, "method", "simclr"),
                                                                     "init": cfg.model.get("init"), **metrics})
    checked = {"input_check": datamodule.dataset, "knn_train_check": getattr(datamodule, "knn_bank", None),
               "knn_val_check": getattr(datamodule, "knn_query", None)}  # unreadable files skipped, by name
    extra = {key: ds.check.summary() for key, ds in checked.items() if getattr(ds, "check", None) is not None}
    (out / "pretrain_metrics.json").write_text(json.dumps({**metrics, **extra}, indent=2))
    log.info("encoder: %s (%s)", encoder, ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return encoder


@hydra.main(config_path=str(config_dir()), config_name="pretrain", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    pretrain(cfg, output_dir())


if __name__ == "__main__":
    main()
