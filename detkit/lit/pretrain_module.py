"""LightningModules for self-supervised pretraining of the shared encoder: SimCLR and DenseCL."""

from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate

from detkit.lit.detection_module import plain_config
from detkit.eval.ssl_eval import extract_features, knn_accuracy
from detkit.lit.optim import WarmupSchedule, param_groups, total_training_steps
from detkit.models.backbones import build_encoder, load_resnet_init
from detkit.models.ssl.densecl import DenseCLLoss, DenseProjector
from detkit.models.ssl.simclr import NTXentLoss, Projector

log = logging.getLogger(__name__)


class SimCLRModule(L.LightningModule):
    """SimCLR: encoder + projector trained with NT-Xent on two views per image.

    Args:
        depth, small_stem: encoder architecture (the same class the detectors use as backbone).
        timm: a timm model name (``pip install "detkit[timm]"``): the encoder is then that model's feature maps
            (:class:`detkit.models.timm_backbone.TimmEncoder`, global average pool of the stride-32 map) instead of
            the ResNet, and its encoder file loads into ``backbone@model.detector.backbone=timm`` with the same name.
        proj_hidden, proj_dim: projector sizes.
        temperature: NT-Xent temperature.
        optimizer: a node of the ``optimizer`` group detection uses (``{"_target_": "torch.optim.SGD", "lr": ...,
            "weight_decay": ..., ...}``; conf/pretrain_job/simclr.yaml takes conf/optimizer/sgd.yaml with SimCLR's
            learning rate); ``lr`` is scaled by ``batch_size / 256`` (linear scaling rule) when ``scale_lr`` is true.
        scheduler: a node of the ``scheduler`` group (a :class:`detkit.lit.optim.WarmupSchedule`): warm-up, then
            cosine to zero by default.
        knn_k, knn_temperature: kNN monitor settings (run when the data module has a labeled monitor set).
        init: start the encoder from weights instead of random: an encoder file (``encoder.pt`` of an earlier
            ``detkit-pretrain``, to adapt an encoder to new images), ``"imagenet"``, or a torchvision ResNet (or
            timm) state dict, as the detectors' ``backbone.init`` takes them. The projector starts fresh.
    """

    #: recorded as ``meta["method"]`` in the encoder file ``detkit-pretrain`` writes
    method = "simclr"

    def __init__(self, depth: int = 18, small_stem: bool = False, proj_hidden: int = 512, proj_dim: int = 128,
                 temperature: float = 0.2, optimizer: dict | None = None, scheduler: dict | None = None,
                 scale_lr: bool = True, knn_k: int = 20, knn_temperature: float = 0.07,
                 timm: str | None = None, init: str | None = None) -> None:
        super().__init__()
        # the defaults are conf/pretrain_job/simclr.yaml's (tests/test_conf.py compares them)
        optimizer = plain_config(optimizer) or {"_target_": "torch.optim.SGD", "lr": 0.6, "momentum": 0.9,
                                                "nesterov": False, "weight_decay": 1e-4}
        scheduler = plain_config(scheduler) or {"_target_": "detkit.lit.optim.WarmupSchedule", "kind": "cosine",
                                                "warmup": 0.1, "warmup_factor": 0.001, "min_ratio": 0.0}
        self.save_hyperparameters({"depth": depth, "small_stem": small_stem, "proj_hidden": proj_hidden,
                                   "proj_dim": proj_dim, "temperature": temperature, "optimizer": optimizer,
                                   "scheduler": scheduler, "scale_lr": scale_lr, "knn_k": knn_k,
                                   "knn_temperature": knn_temperature, "timm": timm, "init": init})
        if timm:
            from detkit.models.timm_backbone import build_timm_encoder

            self.encoder = build_timm_encoder(timm, init)
        else:
            self.encoder = build_encoder({"depth": depth, "small_stem": small_stem})
            if init:
                load_resnet_init(self.encoder, init)
        self.projector = Projector(self.encoder.out_dim, proj_hidden, proj_dim)
        self.criterion = NTXentLoss(temperature)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        v1, v2 = batch
        z = self.projector(self.encoder(torch.cat([v1, v2])))
        loss = self.criterion(*z.chunk(2))
        self.log("pretrain/loss", loss, prog_bar=True, batch_size=len(v1), sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict:
        cfg = dict(self.hparams.optimizer)
        cls = get_class(cfg.pop("_target_"))
        lr, wd = float(cfg.pop("lr")), float(cfg.pop("weight_decay", 0.0))
        if self.hparams.scale_lr:
            batch = self.trainer.datamodule.batch_size * self.trainer.world_size
            lr = lr * batch / 256
        optimizer = cls(param_groups(self.named_parameters(), wd, lr), lr=lr, **cfg)
        schedule = instantiate(self.hparams.scheduler)
        assert isinstance(schedule, WarmupSchedule), schedule
        scheduler = schedule.build(optimizer, total_training_steps(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        if getattr(dm, "knn_bank", None) is None or not self.trainer.is_global_zero:
            return
        bank = extract_features(self.encoder, dm.knn_bank, num_workers=dm.num_workers, device=self.device)
        query = extract_features(self.encoder, dm.knn_query, num_workers=dm.num_workers, device=self.device)
        acc = knn_accuracy(*bank, *query, k=self.hparams.knn_k, temperature=self.hparams.knn_temperature)
        self.log("pretrain/knn_acc", acc, prog_bar=True, rank_zero_only=True)
        log.info("epoch %d: kNN accuracy %.4f", self.current_epoch, acc)


class DenseCLModule(SimCLRModule):
    """DenseCL (:mod:`detkit.models.ssl.densecl`): SimCLR's encoder, global projector, views, optimiser and kNN
    monitor, plus a dense projector on the encoder's last feature map and the dense contrastive loss between the
    two views' grid cells; ``loss = (1 - dense_weight) * global + dense_weight * dense``.

    Args (besides :class:`SimCLRModule`'s):
        dense_weight: the paper's lambda (0.5).
        dense_hidden, dense_dim: dense projector sizes (``null``: ``proj_hidden``, ``proj_dim``).
    """

    method = "densecl"

    def __init__(self, depth: int = 18, small_stem: bool = False, proj_hidden: int = 512, proj_dim: int = 128,
                 temperature: float = 0.2, optimizer: dict | None = None, scheduler: dict | None = None,
                 scale_lr: bool = True, knn_k: int = 20, knn_temperature: float = 0.07,
                 timm: str | None = None, init: str | None = None, dense_weight: float = 0.5,
                 dense_hidden: int | None = None, dense_dim: int | None = None) -> None:
        # spelled out, not **kwargs: the config check (detkit.config_check) names a misspelled key
        super().__init__(depth=depth, small_stem=small_stem, proj_hidden=proj_hidden, proj_dim=proj_dim,
                         temperature=temperature, optimizer=optimizer, scheduler=scheduler, scale_lr=scale_lr,
                         knn_k=knn_k, knn_temperature=knn_temperature, timm=timm, init=init)
        dense_hidden = dense_hidden or self.hparams.proj_hidden
        dense_dim = dense_dim or self.hparams.proj_dim
        self.save_hyperparameters({**self.hparams, "dense_weight": dense_weight, "dense_hidden": dense_hidden,
                                   "dense_dim": dense_dim})
        self.dense_projector = DenseProjector(self.encoder.out_dim, dense_hidden, dense_dim)
        self.criterion = DenseCLLoss(self.hparams.temperature, dense_weight)

    def forward_views(self, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both views through the encoder once -> the loss and its parts (``loss``, ``loss_global``,
        ``loss_dense``)."""
        c5 = self.encoder.features(self.encoder.normalize(torch.cat([v1, v2])))["c5"]  # what encoder() pools
        z = self.projector(torch.flatten(F.adaptive_avg_pool2d(c5, 1), 1))
        d = self.dense_projector(c5)
        return self.criterion(*z.chunk(2), *d.chunk(2), *c5.chunk(2))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        v1, v2 = batch
        out = self.forward_views(v1, v2)
        self.log("pretrain/loss", out["loss"], prog_bar=True, batch_size=len(v1), sync_dist=True)
        self.log("pretrain/loss_global", out["loss_global"], batch_size=len(v1), sync_dist=True)
        self.log("pretrain/loss_dense", out["loss_dense"], batch_size=len(v1), sync_dist=True)
        return out["loss"]
