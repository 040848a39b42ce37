"""The ResNet encoder shared by SimCLR pretraining and both detectors, the detection backbone (encoder + neck),
and the encoder file hand-off.

An encoder file (written by ``detkit-pretrain`` as ``encoder.pt``) is a plain dict loadable with
``torch.load(weights_only=True)``::

    {"format": "detkit-encoder/1", "arch": {"depth": 18, "small_stem": False},
     "state_dict": ResNetEncoder.state_dict(), "meta": {...}}

The state dict uses torchvision's ResNet key names (``conv1.weight``, ``layer1.0.bn1.running_mean`` ...) without
``fc``, plus the ``pixel_mean``/``pixel_std`` buffers, so one normalisation travels from pretraining to fine-tuning.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50

from detkit.models.necks import FPN, PANNeck

ENCODER_FORMAT = "detkit-encoder/1"
_BUILDERS = {18: resnet18, 34: resnet34, 50: resnet50}
#: ImageNet RGB statistics in 0..255 pixel units; a convention, not pretrained weights.
DEFAULT_MEAN = (123.675, 116.28, 103.53)
DEFAULT_STD = (58.395, 57.12, 57.375)
LEVELS = ("c2", "c3", "c4", "c5")


class EncoderLoadError(RuntimeError):
    """An encoder file does not fit the model it is loaded into (wrong architecture, missing/unexpected keys)."""


class ResNetEncoder(nn.Module):
    """A torchvision ResNet trunk (``weights=None``) without its classifier.

    ``forward(images)`` takes ``[B, 3, H, W]`` RGB pixels in 0..255 (uint8 or float), normalises them with the
    ``pixel_mean``/``pixel_std`` buffers and returns pooled features ``[B, out_dim]``; :meth:`features` returns
    the ``c2..c5`` maps of an already normalised batch.

    Args:
        depth: 18, 34 or 50.
        small_stem: replace the 7x7/2 conv + max-pool stem by a 3x3/1 conv (for inputs of 96 px or less, e.g.
            CIFAR); strides of ``c2..c5`` become 1, 2, 4, 8 instead of 4, 8, 16, 32.
        zero_init_residual: zero-init the last BN of each residual branch (torchvision option).
    """

    def __init__(self, depth: int = 18, small_stem: bool = False, zero_init_residual: bool = False) -> None:
        super().__init__()
        if depth not in _BUILDERS:
            raise ValueError(f"ResNet depth must be one of {sorted(_BUILDERS)}, got {depth}")
        net = _BUILDERS[depth](weights=None, zero_init_residual=zero_init_residual)
        if small_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        self.depth, self.small_stem = depth, small_stem
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.register_buffer("pixel_mean", torch.tensor(DEFAULT_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(DEFAULT_STD).view(1, 3, 1, 1))
        expansion = 4 if depth >= 50 else 1
        self.channels = {"c2": 64 * expansion, "c3": 128 * expansion, "c4": 256 * expansion, "c5": 512 * expansion}
        first = 1 if small_stem else 4
        self.strides = {name: first * 2**i for i, name in enumerate(LEVELS)}
        self.out_dim = self.channels["c5"]

    @property
    def arch(self) -> dict[str, Any]:
        return {"depth": self.depth, "small_stem": self.small_stem}

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` 0..255 pixels -> normalised float, in the dtype of the weights."""
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std  # keeps channels_last

    def features(self, x: torch.Tensor, upto: str = "c5") -> dict[str, torch.Tensor]:
        """Normalised ``[B, 3, H, W]`` -> ``{"c2": [B, C2, H/4, W/4], ..., "c5": ...}`` (up to ``upto``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name, layer in zip(LEVELS, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            out[name] = x
            if name == upto:
                break
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` 0..255 pixels -> pooled features ``[B, out_dim]``."""
        c5 = self.features(self.normalize(images))["c5"]
        return torch.flatten(F.adaptive_avg_pool2d(c5, 1), 1)


def save_encoder(encoder: ResNetEncoder, path: str | Path, meta: dict | None = None) -> Path:
    """Write an encoder file (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    torch.save({"format": ENCODER_FORMAT, "arch": encoder.arch, "state_dict": state, "meta": meta or {}}, path)
    return path


def read_encoder_file(path: str | Path) -> dict:
    """Load and check an encoder file with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise EncoderLoadError(f"encoder file {path} does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != ENCODER_FORMAT:
        raise EncoderLoadError(f"{path} is not a detkit encoder file (expected format {ENCODER_FORMAT!r}; "
                               "detkit-pretrain writes one as encoder.pt in its output directory)")
    return blob


def load_encoder_weights(encoder: ResNetEncoder, path: str | Path) -> None:
    """Load an encoder file into ``encoder``, strictly: every key must match, or a clear error lists them."""
    blob = read_encoder_file(path)
    if blob["arch"] != encoder.arch:
        raise EncoderLoadError(f"{path} holds a ResNet {blob['arch']} but the model is configured as "
                               f"{encoder.arch}: set model.detector.backbone.depth/small_stem to match the file")
    own = encoder.state_dict()
    missing = sorted(set(own) - set(blob["state_dict"]))
    unexpected = sorted(set(blob["state_dict"]) - set(own))
    mismatched = sorted(k for k in set(own) & set(blob["state_dict"]) if own[k].shape != blob["state_dict"][k].shape)
    if missing or unexpected or mismatched:
        raise EncoderLoadError(f"{path} does not fit the encoder: missing keys {missing}, unexpected keys "
                               f"{unexpected}, shape mismatches {mismatched}")
    encoder.load_state_dict(blob["state_dict"], strict=True)


def load_encoder(path: str | Path) -> ResNetEncoder:
    """Build the encoder an encoder file describes and load its weights; ``forward`` gives pooled features."""
    blob = read_encoder_file(path)
    encoder = ResNetEncoder(**blob["arch"])
    load_encoder_weights(encoder, path)
    return encoder


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm that always normalises with its stored ``running_mean``/``running_var`` and never updates them,
    whatever ``.training`` says; its affine ``weight``/``bias`` still train unless their ``requires_grad`` is off.

    Freezing by class rather than by ``.eval()`` survives trainers that set module modes themselves (Lightning
    keeps, and restores, each module's own mode). It is deliberately *not* a ``torch.nn.modules.batchnorm._BatchNorm``
    subclass: ``SyncBatchNorm.convert_sync_batchnorm`` (what ``trainer=ddp`` with ``sync_batchnorm: true`` runs)
    replaces every ``_BatchNorm`` with a trainable ``SyncBatchNorm``, which would silently undo the freezing on
    multi-GPU runs. The state-dict keys are those of ``nn.BatchNorm2d``, so encoder files load either way.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, train_affine: bool = True) -> "FrozenBatchNorm2d":
        """A frozen copy of ``bn`` (same statistics and affine values); ``train_affine=False`` also fixes those."""
        frozen = cls(bn.num_features, bn.eps).to(bn.running_mean.device)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                getattr(frozen, name).copy_(getattr(bn, name))
        frozen.weight.requires_grad_(train_affine and bn.weight.requires_grad)
        frozen.bias.requires_grad_(train_affine and bn.bias.requires_grad)
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batchnorm(module: nn.Module, train_affine: bool = True) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` by a :class:`FrozenBatchNorm2d` copy (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d.from_batchnorm(child, train_affine))
        else:
            freeze_batchnorm(child, train_affine)
    return module


NECKS = ("fpn", "pan", "none")


class Backbone(nn.Module):
    """Detection backbone: the shared :class:`ResNetEncoder`, a neck (FPN, PAN or none) and freezing options.

    The contract every detector relies on: ``forward(images)`` returns an ordered dict of feature maps (finest
    first), :attr:`out_channels` (the same for every level) and :attr:`strides` (per level name, in input pixels).

    Args:
        depth, small_stem: the encoder architecture (must match an ``init`` file).
        init: path to an encoder file from ``detkit-pretrain``; ``None`` for random initialisation.
        levels: encoder levels used, e.g. ``["c4"]`` (single level, ``neck: none``) or ``["c3", "c4", "c5"]``.
        neck: ``"fpn"`` (:class:`detkit.models.necks.FPN`, Faster R-CNN), ``"pan"``
            (:class:`detkit.models.necks.PANNeck`, YOLO) or ``"none"`` (one level, the encoder's own channels).
        neck_channels: output channels of the neck.
        extra_pool: FPN only: add a max-pooled extra coarse level (``p6`` for ``c3-c5``).
        freeze_at: 0 trains everything; 1 freezes the stem; ``k`` freezes the stem and ``layer1..layer{k-1}`` (weights
            and BatchNorm statistics).
        norm: ``"bn"`` (BatchNorm trains), ``"frozen_stats"`` (BatchNorm uses its stored statistics but its affine
            parameters train) or ``"frozen"`` (statistics and affine parameters fixed).
    """

    def __init__(
        self,
        depth: int = 18,
        small_stem: bool = False,
        init: str | None = None,
        levels: Sequence[str] = ("c3", "c4", "c5"),
        neck: str = "fpn",
        neck_channels: int = 128,
        extra_pool: bool = False,
        freeze_at: int = 0,
        norm: str = "bn",
    ) -> None:
        super().__init__()
        if norm not in ("bn", "frozen_stats", "frozen"):
            raise ValueError(f"backbone norm must be 'bn', 'frozen_stats' or 'frozen', got {norm!r}")
        if neck not in NECKS:
            raise ValueError(f"backbone neck must be one of {NECKS}, got {neck!r}")
        levels = list(levels)
        if not levels or any(lv not in LEVELS for lv in levels) or levels != sorted(levels):
            raise ValueError(f"backbone levels must be a non-empty, finest-first subset of {LEVELS}, got {levels}")
        if len(levels) > 1 and neck == "none":
            raise ValueError(f"levels {levels} need a neck (fpn or pan): without one the levels have different widths")
        if extra_pool and neck != "fpn":
            raise ValueError("extra_pool adds a max-pooled FPN level: it needs neck=fpn")
        self.encoder = ResNetEncoder(depth=depth, small_stem=small_stem)
        if init:
            load_encoder_weights(self.encoder, init)
        self.levels, self.norm, self.freeze_at = levels, norm, freeze_at
        enc = self.encoder
        in_channels = [enc.channels[lv] for lv in levels]
        strides = [enc.strides[lv] for lv in levels]
        names = list(levels) if neck == "none" else [f"p{lv[1]}" for lv in levels]
        if neck == "fpn":
            self.neck: nn.Module | None = FPN(in_channels, neck_channels, extra_pool=extra_pool)
            if extra_pool:
                names.append(f"p{int(levels[-1][1]) + 1}")
                strides.append(strides[-1] * 2)
        elif neck == "pan":
            self.neck = PANNeck(in_channels, neck_channels)
        else:
            self.neck = None
        self.out_channels = in_channels[0] if neck == "none" else neck_channels
        self.strides = dict(zip(names, strides))
        self._freeze()
    def _freeze(self) -> None:
        enc = self.encoder
        stages = [nn.ModuleList([enc.conv1, enc.bn1]), enc.layer1, enc.layer2, enc.layer3, enc.layer4]
        nn.ModuleList(stages[: self.freeze_at]).requires_grad_(False)  # frozen stages: weights and statistics
        if self.norm != "bn":
            freeze_batchnorm(enc, train_affine=self.norm == "frozen_stats")
            return
        if self.freeze_at >= 1:
            enc.bn1 = FrozenBatchNorm2d.from_batchnorm(enc.bn1, train_affine=False)
        for layer in stages[1: self.freeze_at]:
            freeze_batchnorm(layer, train_affine=False)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """``[B, 3, H, W]`` 0..255 pixels -> ``{level: [B, out_channels, H/stride, W/stride]}``, finest first."""
        feats = self.encoder.features(self.encoder.normalize(images), upto=self.levels[-1])
        maps = [feats[lv] for lv in self.levels]
        if self.neck is not None:
            maps = self.neck(maps)
        return OrderedDict(zip(self.strides, maps))
