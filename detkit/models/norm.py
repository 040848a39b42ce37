"""Normalisation layers of the detection networks, chosen by name: ``"bn"``, ``"gn"`` or ``"none"``.

BatchNorm normalises with statistics of the batch on each device; below about 16 images per device those statistics
are noisy, and GroupNorm (Wu & He 2018), which normalises each image over groups of channels, is the usual
replacement (detectron2's ``GN`` configs; MoCo's and DenseCL's detection transfer use SyncBN at 16 images per
device instead). :func:`batchnorm_to_groupnorm` turns an encoder pretrained with BatchNorm into one with GroupNorm
that starts from the same affine scale and shift (the running statistics have no GroupNorm counterpart).
"""

from __future__ import annotations

import math

from torch import nn

NORMS = ("bn", "gn", "none")
#: GroupNorm's group count where the channels allow it (Wu & He 2018's default).
GROUPS = 32


def group_count(channels: int, groups: int = GROUPS) -> int:
    """The largest divisor of ``channels`` that is at most ``groups``: 32 for 64-512 channels (ResNets, necks), 24 for
    48, 20 for 40; ``channels`` itself (one channel per group) from 32 channels down."""
    return max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)


def check_norm(norm: str, what: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"{what} norm must be one of {NORMS}, got {norm!r}")
    return norm


def norm2d(norm: str, channels: int) -> nn.Module:
    """A normalisation layer over ``[B, channels, H, W]`` maps: BatchNorm2d, GroupNorm or identity."""
    check_norm(norm, "the")
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(group_count(channels), channels)
    return nn.Identity()


def batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` under ``module`` (in place) by a GroupNorm over the same channels whose
    affine weight and bias are the BatchNorm's (same device, dtype and ``requires_grad``): a pretrained encoder keeps
    its learned scale and shift, and normalises per image from now on. Other BatchNorm kinds (SyncBatchNorm, a
    subclass with a fused activation, a frozen BatchNorm) are refused by name: convert before freezing or syncing.
    Returns ``module``."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            gn = nn.GroupNorm(group_count(child.num_features), child.num_features, eps=child.eps,
                              affine=child.affine)
            if child.affine:
                gn = gn.to(device=child.weight.device, dtype=child.weight.dtype)
                gn.weight.data.copy_(child.weight.data)
                gn.bias.data.copy_(child.bias.data)
                gn.weight.requires_grad_(child.weight.requires_grad)
                gn.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, gn)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(child).__name__:
            raise ValueError(f"cannot turn {name!r} ({type(child).__name__}) into GroupNorm: only plain "
                             "nn.BatchNorm2d layers are converted (convert before freezing or SyncBatchNorm)")
        else:
            batchnorm_to_groupnorm(child)
    return module
