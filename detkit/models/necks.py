"""Necks: feature-pyramid aggregation of the encoder's ``c3..c5`` maps into maps of one width.

* :class:`FPN` (Lin et al. 2017) — the top-down pyramid of Faster R-CNN with FPN;
* :class:`PANNeck` (Liu et al. 2018, PANet; YOLOv5-style, light) — top-down then bottom-up, for the YOLO head.

Both take finest-first maps and return finest-first maps; :class:`detkit.models.backbones.Backbone` picks one with
``neck: fpn | pan | none``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detkit.models.norm import check_norm, norm2d


def conv_bn_act(cin: int, cout: int, k: int = 3, s: int = 1, norm: str = "bn") -> nn.Sequential:
    """``k x k`` convolution (stride ``s``) -> norm (BatchNorm by default, :func:`detkit.models.norm.norm2d`) ->
    SiLU, the YOLO-family building block (the convolution has a bias only without a norm)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=norm == "none"), norm2d(norm, cout),
                         nn.SiLU(inplace=True))


class FPN(nn.Module):
    """Feature pyramid network (Lin et al. 2017): 1x1 lateral convs, nearest-upsample top-down path merged by
    addition, 3x3 output convs; optionally one extra coarser level by stride-2 max-pooling of the top output
    (``p6`` for the RPN, as in the original).

    Args:
        in_channels: channels of the input levels, finest first.
        out_channels: channels of every output level.
        extra_pool: add the max-pooled extra level.
        norm: ``"none"`` (the paper's), or ``"bn"``/``"gn"`` after every lateral and output convolution (detectron2's
            ``FPN.NORM``, used by the SSL transfer recipes of MoCo and DenseCL).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, extra_pool: bool = False,
                 norm: str = "none") -> None:
        super().__init__()
        check_norm(norm, "FPN")
        self.lateral = nn.ModuleList(self._conv(c, out_channels, 1, norm) for c in in_channels)
        self.output = nn.ModuleList(self._conv(out_channels, out_channels, 3, norm) for _ in in_channels)
        self.extra_pool = extra_pool
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _conv(cin: int, cout: int, k: int, norm: str) -> nn.Module:
        """A ``k x k`` convolution, followed by the norm unless it is ``"none"`` (then a bare ``nn.Conv2d`` with a
        bias, so the paper's FPN keeps the parameter names of earlier checkpoints)."""
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=norm == "none")
        return conv if norm == "none" else nn.Sequential(conv, norm2d(norm, cout))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Finest-first feature maps -> finest-first outputs (plus the extra level last)."""
        inner = self.lateral[-1](features[-1])
        outs = [self.output[-1](inner)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](inner))
        if self.extra_pool:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs


class PANNeck(nn.Module):
    """Path-aggregation neck: a top-down FPN merge, then a bottom-up pass; conv-norm-SiLU blocks throughout
    (``norm``: ``"bn"``, ``"gn"`` or ``"none"``).

    Input: encoder maps (e.g. ``c3, c4, c5``); output: as many maps of ``channels``, at the same strides.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 96, norm: str = "bn") -> None:
        super().__init__()
        check_norm(norm, "PAN")
        self.lateral = nn.ModuleList(conv_bn_act(c, channels, 1, norm=norm) for c in in_channels)
        self.top_down = nn.ModuleList(conv_bn_act(channels, channels, norm=norm) for _ in in_channels[:-1])
        self.down = nn.ModuleList(conv_bn_act(channels, channels, 3, 2, norm=norm) for _ in in_channels[:-1])
        self.bottom_up = nn.ModuleList(conv_bn_act(channels, channels, norm=norm) for _ in in_channels[:-1])

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lat = [layer(f) for layer, f in zip(self.lateral, feats)]
        td = [lat[-1]]
        for i in range(len(lat) - 2, -1, -1):
            up = F.interpolate(td[0], size=lat[i].shape[-2:], mode="nearest")
            td.insert(0, self.top_down[i](lat[i] + up))
        out = [td[0]]
        for i in range(1, len(td)):
            out.append(self.bottom_up[i - 1](td[i] + self.down[i - 1](out[-1])))
        return out
