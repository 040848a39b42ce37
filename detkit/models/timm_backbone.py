"""timm encoders for both detectors and SimCLR (optional: ``pip install "detkit[timm]"``).

:class:`TimmEncoder` wraps ``timm.create_model(name, features_only=True)`` with the interface of
:class:`detkit.models.backbones.ResNetEncoder`: ``channels``/``strides`` per level ``c2..c5`` (the feature maps at
reductions 4, 8, 16 and 32), ``features``, ``normalize`` (0..255 pixels, with the model's own pixel statistics from
its pretrained config, kept as ``pixel_mean``/``pixel_std`` buffers so pretraining and fine-tuning normalise alike),
``forward`` (global average pool of ``c5``, the SimCLR encoder), ``arch`` (``{"timm": name}``, saved in encoder
files) and ``freeze`` by stage. Its parameters are grouped into the stages ``stem, layer1..layer4`` (everything up to
the reduction-4 map's stage, then one stage per level), so ``freeze_at`` and ``model.freeze=[backbone.encoder.layer1]``
mean what they mean for a ResNet.

:class:`TimmBackbone` is :class:`detkit.models.backbones.Backbone` (necks, levels, ``norm``, ``freeze_at``) over a
timm encoder: ``backbone@model.detector.backbone=timm model.detector.backbone.name=convnext_atto``.

timm's ``BatchNormAct2d`` (BatchNorm with its activation fused into one module, in EfficientNet, MobileNet, CSP
nets...) is split into a plain ``nn.BatchNorm2d`` followed by its activation, so detkit's frozen BatchNorm and
``SyncBatchNorm.convert_sync_batchnorm`` (``trainer=ddp``) see an ordinary BatchNorm and keep the activation.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detkit.models.backbones import (IMAGENET, LEVELS, STAGES, Backbone, EncoderLoadError, FrozenBatchNorm2d,
                                     freeze_batchnorm, is_encoder_file, load_encoder_weights)

log = logging.getLogger(__name__)
#: The reductions (input pixels per feature pixel) of the levels ``c2..c5``.
REDUCTIONS = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


def _timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('timm backbones need timm: pip install "detkit[timm]"') from e
    return timm


class NormAct(nn.Module):
    """timm's ``BatchNormAct2d`` as ``act(drop(bn(x)))`` with a plain ``nn.BatchNorm2d``."""

    def __init__(self, bn: nn.BatchNorm2d, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.bn, self.drop, self.act = bn, drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.bn(x)))


def split_norm_act(module: nn.Module) -> nn.Module:
    """Replace every timm ``BatchNormAct2d`` in ``module`` by a :class:`NormAct` holding the same statistics."""
    from timm.layers import BatchNormAct2d

    for name, child in module.named_children():
        if isinstance(child, BatchNormAct2d):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, NormAct(bn, child.drop, child.act))
        else:
            split_norm_act(child)
    return module


def _inside(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class TimmEncoder(nn.Module):
    """A timm model as a detkit encoder (see the module docstring).

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``convnext_atto``, ``mobilenetv3_small_050``,
            ``efficientnet_b0``, ``cs3darknet_s``, ``resnet18``.
        weights: ``None`` (random init), ``"imagenet"`` (timm's pretrained weights, downloaded by timm) or a path to
            a timm-format state dict of this model (loaded by timm, e.g. the ``model.safetensors`` of its Hugging
            Face repository).
    """

    def __init__(self, name: str, weights: str | None = None) -> None:
        super().__init__()
        timm = _timm()
        kwargs: dict[str, Any] = {"features_only": True, "out_indices": (-4, -3, -2, -1)}
        if weights is None:
            body = timm.create_model(name, pretrained=False, **kwargs)
        elif weights == IMAGENET:
            body = _create_pretrained(timm, name, kwargs)
        else:
            body = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
        reductions = list(body.feature_info.reduction())
        if reductions != list(REDUCTIONS.values()):
            raise ValueError(f"timm model {name!r}: its last four feature maps have reductions {reductions}; detkit's "
                             f"necks need {list(REDUCTIONS.values())} (c2..c5). Choose a convolutional model with "
                             "stride-32 output")
        self.name, self.body = name, split_norm_act(body)
        self.channels = dict(zip(LEVELS, body.feature_info.channels()))
        self.strides = dict(REDUCTIONS)
        self.out_dim = self.channels["c5"]
        cfg = getattr(body, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("pixel_mean", 255 * torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", 255 * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.stage_of = self._stages(body.feature_info.module_name())

    @property
    def arch(self) -> dict[str, Any]:
        return {"timm": self.name}

    def _stages(self, out_modules: Sequence[str]) -> dict[str, int]:
        """Stage index (0 = stem, 1..4 = the stages ending in c2..c5) of every module with parameters or buffers
        of its own, in registration (= execution) order: the modules up to the c2 stage's output module are the
        stem; a module inside level k's output module, or between level k-1's and level k's, is stage k+1."""
        outs = [(m, m.replace(".", "_")) for m in out_modules]  # FeatureListNet flattens "stages.0" to "stages_0"
        stage_of: dict[str, int] = {}
        k, entered = 0, False
        for name, module in self.body.named_modules():
            if not any(True for _ in module.parameters(recurse=False)) and \
                    not any(True for _ in module.buffers(recurse=False)):
                continue
            while k < len(outs) and entered and not _inside(name, outs[k]):
                k, entered = k + 1, False
            if k < len(outs) and _inside(name, outs[k]):
                entered = True
            stage_of[name] = 0 if k == 0 and not entered else min(k + 1, len(outs))
        return stage_of

    def stage_parameters(self) -> dict[str, list[str]]:
        """``{"stem": [parameter names], "layer1": [...], ...}``, names relative to this encoder."""
        out: dict[str, list[str]] = {s: [] for s in STAGES}
        for mod_name, stage in self.stage_of.items():
            module = self.body.get_submodule(mod_name) if mod_name else self.body
            out[STAGES[stage]] += [f"body.{mod_name}.{p}".replace("..", ".") for p, _ in
                                   module.named_parameters(recurse=False)]
        return out

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` 0..255 pixels -> normalised float, in the dtype of the weights."""
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def features(self, x: torch.Tensor, upto: str = "c5") -> dict[str, torch.Tensor]:
        """Normalised ``[B, 3, H, W]`` -> ``{"c2": [B, C2, H/4, W/4], ..., "c5": ...}`` (all four are computed:
        timm's feature models run to their last output)."""
        return dict(zip(LEVELS, self.body(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` 0..255 pixels -> pooled features ``[B, out_dim]`` (global average pool of ``c5``)."""
        c5 = self.features(self.normalize(images))["c5"]
        return torch.flatten(F.adaptive_avg_pool2d(c5, 1), 1)

    def freeze(self, freeze_at: int, norm: str) -> None:
        """As :meth:`detkit.models.backbones.ResNetEncoder.freeze`, by the stages of :meth:`stage_parameters`:
        ``freeze_at=k`` fixes the weights and BatchNorm statistics of the first ``k`` stages; ``norm`` applies to
        every BatchNorm (other norms, e.g. ConvNeXt's LayerNorm, have no statistics and follow ``freeze_at``)."""
        for mod_name, stage in self.stage_of.items():
            if stage >= freeze_at:
                continue
            module = self.body.get_submodule(mod_name) if mod_name else self.body
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            if isinstance(module, nn.BatchNorm2d) and mod_name:
                parent, _, attr = mod_name.rpartition(".")
                holder = self.body.get_submodule(parent) if parent else self.body
                setattr(holder, attr, FrozenBatchNorm2d.from_batchnorm(module, train_affine=False))
        if norm in ("frozen_stats", "frozen"):  # (gn: GroupNorm already, no statistics)
            freeze_batchnorm(self.body, train_affine=norm == "frozen_stats")


def _create_pretrained(timm, name: str, kwargs: dict) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``: timm's own download and cache. A failure (no network) becomes
    one error naming what to fetch and how to pass it."""
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # huggingface_hub / urllib errors differ by version; all mean "could not get the file"
        cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
        hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        url = f"https://huggingface.co/{hub}/resolve/main/model.safetensors" if hub else getattr(cfg, "url", "")
        cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
        raise EncoderLoadError(
            f"init=imagenet: timm could not fetch the pretrained weights of {name!r} ({type(e).__name__}: {e}). "
            f"Without network access, fetch {url} elsewhere and pass model.detector.backbone.init=PATH to that "
            f"file (or place the Hugging Face repository {hub} in timm's cache, {cache})") from e


def build_timm_encoder(name: str, init: str | None = None) -> "TimmEncoder":
    """The timm encoder ``name`` initialised from ``init``: ``None`` (random), ``"imagenet"`` (timm's pretrained
    weights), an encoder file from ``detkit-pretrain model.timm=NAME`` (loaded strictly), or a timm state dict."""
    if init and init != IMAGENET and not Path(init).is_file():
        raise EncoderLoadError(f"encoder file {init} does not exist (init takes an encoder file from "
                               "detkit-pretrain, a timm state dict of the model, or imagenet)")
    encoder_file = bool(init) and init != IMAGENET and is_encoder_file(init)
    encoder = TimmEncoder(name, weights=None if encoder_file else init)
    if encoder_file:
        load_encoder_weights(encoder, init)
    return encoder


class TimmBackbone(Backbone):
    """:class:`detkit.models.backbones.Backbone` over a :class:`TimmEncoder` (same necks, levels and freezing).

    Args:
        name: the timm model name.
        init: ``None`` (random), ``"imagenet"`` (timm's pretrained weights, with their pixel statistics), an encoder
            file from ``detkit-pretrain model.timm=NAME``, or a timm-format state dict of the model.
        levels, neck, neck_channels, extra_pool, freeze_at, norm, neck_norm: as for :class:`Backbone`; ``freeze_at=k`` freezes
            the first ``k`` of the stages ``stem, layer1..layer4`` (see :meth:`TimmEncoder.stage_parameters`).
    """

    def __init__(
        self,
        name: str = "convnext_atto",
        init: str | None = None,
        levels: Sequence[str] = ("c3", "c4", "c5"),
        neck: str = "fpn",
        neck_channels: int = 128,
        extra_pool: bool = False,
        freeze_at: int = 0,
        norm: str = "bn",
        neck_norm: str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        levels = self._check(levels, neck, extra_pool, norm)
        self.encoder = build_timm_encoder(name, init)
        self._build_neck(levels, neck, neck_channels, extra_pool, freeze_at, norm, neck_norm)

    @classmethod
    def strides_for(cls, levels: Sequence[str] = ("c3", "c4", "c5"), neck: str = "fpn", extra_pool: bool = False,
                    **_: Any) -> dict[str, int]:
        """As :meth:`Backbone.strides_for`, over the timm encoder's reductions."""
        return cls.output_strides(dict(REDUCTIONS), list(levels), neck, extra_pool)
