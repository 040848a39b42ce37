"""The ResNet encoder shared by SimCLR pretraining and both detectors, the detection backbone (encoder + neck),
and the encoder file hand-off.

An encoder file (written by ``detkit-pretrain`` as ``encoder.pt``) is a plain dict loadable with
``torch.load(weights_only=True)``::

    {"format": "detkit-encoder/1", "arch": {"depth": 18, "small_stem": False},
     "state_dict": ResNetEncoder.state_dict(), "meta": {...}}

The state dict uses torchvision's ResNet key names (``conv1.weight``, ``layer1.0.bn1.running_mean`` ...) without
``fc``, plus the ``pixel_mean``/``pixel_std`` buffers, so one normalisation travels from pretraining to fine-tuning.
A timm encoder (:mod:`detkit.models.timm_backbone`) writes the same file with ``"arch": {"timm": NAME}``.

``Backbone(init=...)`` takes such a file, ``"imagenet"`` (torchvision's ImageNet weights for the chosen ResNet,
downloaded once into torch's cache, ``$TORCH_HOME/hub/checkpoints``) or a torchvision-format ResNet state dict
(``torch.save(resnet18(weights=...).state_dict(), PATH)``, e.g. that cached file), loaded with ImageNet's pixel
normalisation.
"""

from __future__ import annotations

import logging
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence
from urllib.error import URLError
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights, resnet18, resnet34, resnet50

from detkit.errors import UserError
from detkit.models.norm import batchnorm_to_groupnorm
from detkit.models.necks import FPN, PANNeck

log = logging.getLogger(__name__)

ENCODER_FORMAT = "detkit-encoder/1"
_BUILDERS = {18: resnet18, 34: resnet34, 50: resnet50}
#: ``init: imagenet``: torchvision's weights enum per depth (its default, i.e. best, ImageNet-1k weights).
IMAGENET_WEIGHTS = {18: ResNet18_Weights.DEFAULT, 34: ResNet34_Weights.DEFAULT, 50: ResNet50_Weights.DEFAULT}
IMAGENET = "imagenet"
#: ImageNet RGB statistics in 0..255 pixel units; a convention, not pretrained weights.
DEFAULT_MEAN = (123.675, 116.28, 103.53)
DEFAULT_STD = (58.395, 57.12, 57.375)
LEVELS = ("c2", "c3", "c4", "c5")
#: Stage names, coarse to fine grouping of an encoder's parameters: ``freeze_at=k`` freezes the first ``k``.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class EncoderLoadError(UserError, RuntimeError):
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
        self.strides = self.level_strides(small_stem)
        self.out_dim = self.channels["c5"]

    @staticmethod
    def level_strides(small_stem: bool = False) -> dict[str, int]:
        """``{"c2": 4, "c3": 8, "c4": 16, "c5": 32}`` (``small_stem``: 1, 2, 4, 8), in input pixels."""
        first = 1 if small_stem else 4
        return {name: first * 2**i for i, name in enumerate(LEVELS)}

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

    def stage_parameters(self) -> dict[str, list[str]]:
        """``{"stem": ["conv1.weight", "bn1.weight", "bn1.bias"], "layer1": [...], ...}`` (names in this module)."""
        return {stage: [n for n, _ in self.named_parameters()
                        if n.split(".")[0] in (("conv1", "bn1") if stage == "stem" else (stage,))] for stage in STAGES}

    def freeze(self, freeze_at: int, norm: str) -> None:
        """``freeze_at=k``: weights and BatchNorm statistics of the stem and ``layer1..layer{k-1}`` fixed;
        ``norm``: ``bn`` | ``gn`` (already GroupNorm: no statistics) | ``frozen_stats`` | ``frozen`` for every
        BatchNorm (see :class:`Backbone`)."""
        stages = [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]
        nn.ModuleList(stages[:freeze_at]).requires_grad_(False)  # frozen stages: weights and statistics
        if norm == "gn":  # GroupNorm keeps no statistics: the frozen stages' weights are all there is to fix
            return
        if norm != "bn":
            freeze_batchnorm(self, train_affine=norm == "frozen_stats")
            return
        if freeze_at >= 1:
            self.bn1 = FrozenBatchNorm2d.from_batchnorm(self.bn1, train_affine=False)
        for layer in stages[1:freeze_at]:
            freeze_batchnorm(layer, train_affine=False)


def build_encoder(arch: dict[str, Any]) -> nn.Module:
    """The encoder an encoder file's ``arch`` describes (random weights): a ResNet or, with ``"timm"``, a timm
    model (:class:`detkit.models.timm_backbone.TimmEncoder`, needs ``pip install "detkit[timm]"``)."""
    if "timm" in arch:
        from detkit.models.timm_backbone import TimmEncoder

        return TimmEncoder(arch["timm"])
    return ResNetEncoder(**arch)


def save_encoder(encoder: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
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


def _arch_hint(arch: dict[str, Any]) -> str:
    return "model.detector.backbone.name (backbone@model.detector.backbone=timm)" if "timm" in arch else \
        "model.detector.backbone.depth/small_stem"


def load_state_strict(encoder: nn.Module, state: dict[str, torch.Tensor], source: str,
                      ignore: Sequence[str] = ()) -> int:
    """Load ``state`` into ``encoder``: every key of the encoder (except ``ignore``) must be matched by a tensor of
    the same shape and nothing may be left over, or one error lists the missing, unexpected and mismatched keys.
    Logs and returns the number of matched keys."""
    own = {k: v for k, v in encoder.state_dict().items() if k not in ignore}
    # BatchNorm's step counter is optional: files saved before it existed (torchvision's IMAGENET1K_V1 ResNets) lack
    # it, and torch itself loads them (the encoder keeps its own value)
    optional = {k for k in own if k.endswith("num_batches_tracked") and k not in state}
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise EncoderLoadError(f"{source} does not fit the encoder: missing keys {missing}, unexpected keys "
                               f"{unexpected}, shape mismatches {mismatched}")
    encoder.load_state_dict({**{k: own[k] for k in optional}, **state}, strict=not ignore)
    log.info("%s: %d keys matched, none missing or unexpected", source, len(own))
    return len(own)


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load an encoder file into ``encoder``, strictly: every key must match, or a clear error lists them."""
    blob = read_encoder_file(path)
    if blob["arch"] != encoder.arch:
        raise EncoderLoadError(f"{path} holds a {'timm' if 'timm' in blob['arch'] else 'ResNet'} encoder "
                               f"{blob['arch']} but the model is configured as {encoder.arch}: set "
                               f"{_arch_hint(blob['arch'])} to match the file")
    load_state_strict(encoder, blob["state_dict"], str(path))


def load_encoder(path: str | Path) -> nn.Module:
    """Build the encoder an encoder file describes and load its weights; ``forward`` gives pooled features."""
    blob = read_encoder_file(path)
    encoder = build_encoder(blob["arch"])
    load_encoder_weights(encoder, path)
    return encoder


def is_encoder_file(path: str | Path) -> bool:
    """Whether ``path`` is a detkit encoder file (rather than another library's state dict)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return isinstance(blob, dict) and blob.get("format") == ENCODER_FORMAT


def fetch_torchvision_weights(weights) -> dict[str, torch.Tensor]:
    """``weights.get_state_dict()``: torchvision's download into torch's cache (``$TORCH_HOME/hub/checkpoints``,
    read from there without the network once present). A failed download becomes one error that names the file,
    its URL and the folder to place it in."""
    url = weights.url
    name = Path(urlparse(url).path).name
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        # weights_only: the cached file is read with the restricted unpickler (a file placed there by hand must not
        # run code); check_hash: a download that does not match torchvision's published hash is refused
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise EncoderLoadError(f"init=imagenet: the cached weights file {folder / name} is not the "
                               f"{type(weights).__name__}.{weights.name} file ({type(e).__name__}: {e}); delete it "
                               "and run again, or place the file from its URL there") from e
    except (URLError, OSError) as e:
        raise EncoderLoadError(
            f"init=imagenet: could not download {type(weights).__name__}.{weights.name} ({e}). Without network "
            f"access, fetch {url} elsewhere and place it as {folder / name} (torchvision's cache: "
            f"$TORCH_HOME/hub/checkpoints/{name}), or pass model.detector.backbone.init=PATH to that file") from e


def load_torchvision_resnet(encoder: ResNetEncoder, state: dict[str, torch.Tensor], source: str,
                            mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD) -> None:
    """Load a torchvision ResNet state dict (its classifier ``fc.*`` dropped) into ``encoder``, strictly, and set
    its pixel normalisation to the weights' (``mean``/``std`` in 0..255 units)."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    load_state_strict(encoder, state, source, ignore=("pixel_mean", "pixel_std"))
    with torch.no_grad():
        encoder.pixel_mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
        encoder.pixel_std.copy_(torch.tensor(std).view(1, 3, 1, 1))


def load_resnet_init(encoder: ResNetEncoder, init: str) -> None:
    """``init``: ``"imagenet"``, a detkit encoder file, or a torchvision-format ResNet state dict."""
    if init == IMAGENET:
        if encoder.small_stem:
            raise EncoderLoadError("init=imagenet loads torchvision's ResNet, whose stem is the 7x7/2 convolution: "
                                   "set model.detector.backbone.small_stem=false")
        weights = IMAGENET_WEIGHTS[encoder.depth]
        meta = weights.transforms()
        load_torchvision_resnet(encoder, fetch_torchvision_weights(weights), f"{type(weights).__name__}."
                                f"{weights.name}", [255 * m for m in meta.mean], [255 * s for s in meta.std])
        return
    path = Path(init)
    if not path.is_file():
        raise EncoderLoadError(f"encoder file {path} does not exist (init takes an encoder file from detkit-pretrain, "
                               "a torchvision ResNet state dict, or imagenet)")
    if is_encoder_file(path):
        load_encoder_weights(encoder, path)
        return
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderLoadError(f"{path} is neither a detkit encoder file (format {ENCODER_FORMAT!r}, written by "
                               "detkit-pretrain as encoder.pt) nor a torchvision ResNet state dict")
    load_torchvision_resnet(encoder, state, str(path))


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
        init: path to an encoder file from ``detkit-pretrain``; ``"imagenet"`` for torchvision's ImageNet weights
            of this depth (downloaded once into ``$TORCH_HOME/hub/checkpoints``); a path to a torchvision-format
            ResNet state dict; ``None`` for random initialisation.
        levels: encoder levels used, e.g. ``["c4"]`` (single level, ``neck: none``) or ``["c3", "c4", "c5"]``.
        neck: ``"fpn"`` (:class:`detkit.models.necks.FPN`, Faster R-CNN), ``"pan"``
            (:class:`detkit.models.necks.PANNeck`, YOLO) or ``"none"`` (one level, the encoder's own channels).
        neck_channels: output channels of the neck.
        extra_pool: FPN only: add a max-pooled extra coarse level (``p6`` for ``c3-c5``).
        freeze_at: 0 trains everything; 1 freezes the stem; ``k`` freezes the stem and ``layer1..layer{k-1}`` (weights
            and BatchNorm statistics).
        norm: the encoder's BatchNorm: ``"bn"`` (trains), ``"gn"`` (replaced by GroupNorm starting from its affine
            scale and shift, :func:`detkit.models.norm.batchnorm_to_groupnorm`: for fewer than ~16 images per
            device), ``"frozen_stats"`` (uses its stored statistics, its affine parameters train) or ``"frozen"``
            (statistics and affine parameters fixed).
        neck_norm: normalisation after each neck convolution, ``"none"``, ``"bn"`` or ``"gn"``
            (:mod:`detkit.models.norm`); ``None`` is the neck's own (FPN none, as in the paper; PAN bn).
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
        neck_norm: str | None = None,
    ) -> None:
        super().__init__()
        levels = self._check(levels, neck, extra_pool, norm)
        self.encoder = ResNetEncoder(depth=depth, small_stem=small_stem)
        if init:
            load_resnet_init(self.encoder, init)
        self._build_neck(levels, neck, neck_channels, extra_pool, freeze_at, norm, neck_norm)

    @staticmethod
    def _check(levels: Sequence[str], neck: str, extra_pool: bool, norm: str) -> list[str]:
        if norm not in ("bn", "gn", "frozen_stats", "frozen"):
            raise ValueError(f"backbone norm must be 'bn', 'gn', 'frozen_stats' or 'frozen', got {norm!r}")
        if neck not in NECKS:
            raise ValueError(f"backbone neck must be one of {NECKS}, got {neck!r}")
        levels = list(levels)
        if not levels or any(lv not in LEVELS for lv in levels) or levels != sorted(levels):
            raise ValueError(f"backbone levels must be a non-empty, finest-first subset of {LEVELS}, got {levels}")
        if len(levels) > 1 and neck == "none":
            raise ValueError(f"levels {levels} need a neck (fpn or pan): without one the levels have different widths")
        if extra_pool and neck != "fpn":
            raise ValueError("extra_pool adds a max-pooled FPN level: it needs neck=fpn")
        return levels

    def _build_neck(self, levels: list[str], neck: str, neck_channels: int, extra_pool: bool, freeze_at: int,
                    norm: str, neck_norm: str | None = None) -> None:
        """The neck over ``self.encoder``'s levels, the output names/strides, and the encoder's norm and freezing."""
        self.levels, self.norm, self.freeze_at = levels, norm, freeze_at
        enc = self.encoder
        if norm == "gn":  # after the weights are loaded: GroupNorm starts from the pretrained affine parameters
            batchnorm_to_groupnorm(enc)
        in_channels = [enc.channels[lv] for lv in levels]
        if neck == "fpn":
            self.neck: nn.Module | None = FPN(in_channels, neck_channels, extra_pool=extra_pool,
                                              norm=neck_norm or "none")
        elif neck == "pan":
            self.neck = PANNeck(in_channels, neck_channels, norm=neck_norm or "bn")
        else:
            self.neck = None
        self.out_channels = in_channels[0] if neck == "none" else neck_channels
        self.strides = self.output_strides(enc.strides, levels, neck, extra_pool)
        enc.freeze(freeze_at, norm)

    @staticmethod
    def output_strides(encoder_strides: dict[str, int], levels: Sequence[str], neck: str, extra_pool: bool
                       ) -> dict[str, int]:
        """The output level names and strides (what :attr:`strides` is) for these settings over an encoder's
        ``c2..c5`` strides: the one place they are computed."""
        strides = [encoder_strides[lv] for lv in levels]
        names = list(levels) if neck == "none" else [f"p{lv[1]}" for lv in levels]
        if neck == "fpn" and extra_pool:
            names.append(f"p{int(levels[-1][1]) + 1}")
            strides.append(strides[-1] * 2)
        return dict(zip(names, strides))

    @classmethod
    def strides_for(cls, levels: Sequence[str] = ("c3", "c4", "c5"), neck: str = "fpn", extra_pool: bool = False,
                    small_stem: bool = False, **_: Any) -> dict[str, int]:
        """:attr:`strides` of the backbone these arguments (a config node's keys) would build, without building it
        (no weights are read): what the anchor fit measures against before the model exists."""
        return cls.output_strides(ResNetEncoder.level_strides(small_stem), list(levels), neck, extra_pool)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """``[B, 3, H, W]`` 0..255 pixels -> ``{level: [B, out_channels, H/stride, W/stride]}``, finest first."""
        feats = self.encoder.features(self.encoder.normalize(images), upto=self.levels[-1])
        maps = [feats[lv] for lv in self.levels]
        if self.neck is not None:
            maps = self.neck(maps)
        return OrderedDict(zip(self.strides, maps))
