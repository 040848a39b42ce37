"""RoIAlign as a weighted gather (``torch.nn.functional.embedding_bag``): the same numbers as
``torchvision.ops.roi_align``, with forward and backward passes that use every CPU core and SIMD over channels.

Why: torchvision's CPU ``roi_align`` kernel runs on one thread and, in its backward pass, scatters one scalar at
a time; in a Faster R-CNN training step on CPU that backward alone was 20% of the step (BENCHMARKS.md). RoIAlign
is linear in the features: every output bin is a weighted sum of ``4 * sampling_ratio**2`` feature vectors (the
bilinear corners of its sample points, each weighted by its bilinear weight / the sample count). With the features
laid out as rows ``[B * H * W, C]``, that is exactly ``embedding_bag(mode="sum", per_sample_weights=...)``, whose
CPU kernels (and their backward, a sorted segment-sum) work on whole C-wide rows in parallel.
On CUDA torchvision's kernel is already parallel and stays the default (see ``RoIPooler(impl=...)``).

Semantics reproduced exactly (tested against torchvision on random inputs, values and gradients): sample ``i`` of
bin ``p`` sits at ``start + (p + (i + 0.5) / sampling_ratio) * size / output_size``; coordinates in ``[-1, 0]``
clamp to 0, those past ``size - 1`` clamp to the last pixel, samples outside ``[-1, size]`` contribute 0, and
``aligned=False`` keeps torchvision's minimum RoI size of 1. Only a fixed ``sampling_ratio > 0`` is supported
(torchvision's adaptive count differs per RoI).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from detkit.models.detection.shape_cache import cached


def _axis_corners(coords: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear corners along one axis, as torchvision's ``bilinear_interpolate``.

    ``coords [K, N]`` sample positions in feature pixels, ``size [K, 1]`` the feature map's length on that axis ->
    (``index [K, N, 2]`` low/high pixel, ``weight [K, N, 2]`` their weights, 0 outside ``[-1, size]``).
    Non-finite coordinates (a diverged box) contribute 0 and index pixel 0: never an out-of-bounds index."""
    coords = torch.nan_to_num(coords, nan=-2.0)  # NaN -> outside; +-inf -> +-max float, outside as well
    valid = (coords >= -1) & (coords <= size)
    c = coords.clamp(min=0)
    last = size - 1
    low = torch.minimum(c.floor(), last)
    at_edge = low >= last
    c = torch.where(at_edge, low, c)
    high = torch.where(at_edge, low, low + 1)
    frac = c - low
    weight = torch.stack([1 - frac, frac], dim=-1) * valid[..., None].to(coords.dtype)
    return torch.stack([low, high], dim=-1).long(), weight


_TABLES: dict = {}


def _level_tables(shapes: tuple, batch: int, scales: tuple, device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-level ``(height, width)``, first row in the stacked feature rows, and scale, as device tensors; cached
    per shapes and device (building them from Python numbers on a GPU is a host-to-device copy that waits)."""
    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hw = torch.tensor(shapes, device=device)
        first_row = torch.cumsum(torch.cat([hw.new_zeros(1), batch * hw[:-1].prod(1)]), 0)
        return hw, first_row, torch.tensor(scales, dtype=dtype, device=device)

    return cached(_TABLES, (shapes, batch, scales, str(device), str(dtype)), build)


def roi_align_gather(features: torch.Tensor | Sequence[torch.Tensor], rois: torch.Tensor, output_size: int,
                     spatial_scale: float | Sequence[float], sampling_ratio: int = 2, aligned: bool = True,
                     levels: torch.Tensor | None = None) -> torch.Tensor:
    """RoIAlign of ``rois [K, 5]`` (batch index, x1, y1, x2, y2 in input pixels, xyxy) -> ``[K, C, S, S]`` with
    ``S = output_size``; equal to ``torchvision.ops.roi_align`` with the same arguments.

    ``features`` is one map ``[B, C, H, W]`` with one ``spatial_scale``, or a list of maps (same ``B`` and ``C``,
    e.g. FPN levels) with one scale each and ``levels [K]`` naming each RoI's map. Every RoI of every image and
    level goes through one ``embedding_bag`` call: one bag of ``4 * sampling_ratio**2`` weighted rows per bin.
    """
    if sampling_ratio <= 0:
        raise ValueError("roi_align_gather needs a fixed sampling_ratio > 0 (use torchvision's roi_align for 0)")
    maps = [features] if isinstance(features, torch.Tensor) else list(features)
    scales = [spatial_scale] if isinstance(spatial_scale, (int, float)) else list(spatial_scale)
    if len(maps) != len(scales) or (len(maps) > 1 and levels is None):
        raise ValueError(f"roi_align_gather: {len(maps)} feature maps need as many scales (got {len(scales)}) "
                         "and, when several, a level per RoI")
    k, s, p = len(rois), sampling_ratio, output_size
    b, c = maps[0].shape[:2]
    if k == 0:
        return maps[0].new_zeros(0, c, p, p)
    dtype, device = maps[0].dtype, maps[0].device
    gdtype = torch.float64 if dtype == torch.float64 else torch.float32  # geometry never in half precision
    hw, first_row, scale_of_level = _level_tables(tuple(tuple(m.shape[2:]) for m in maps), b, tuple(scales),
                                                  device, gdtype)
    lvl = levels.long() if levels is not None else torch.zeros(k, dtype=torch.long, device=device)
    h, w = hw[lvl, 0:1].to(gdtype), hw[lvl, 1:2].to(gdtype)  # [K, 1]
    scale = scale_of_level[lvl, None]

    offset = 0.5 if aligned else 0.0
    boxes = rois[:, 1:].to(gdtype) * scale - offset
    start, size = boxes[:, :2], boxes[:, 2:] - boxes[:, :2]
    if not aligned:
        size = size.clamp(min=1.0)
    steps = (torch.arange(p * s, device=device, dtype=gdtype) + 0.5) / (p * s)
    ys_idx, ys_w = _axis_corners(start[:, 1:2] + steps * size[:, 1:2], h)  # [K, p*s, 2]
    xs_idx, xs_w = _axis_corners(start[:, 0:1] + steps * size[:, 0:1], w)
    # per axis [K, p, s, 2] -> every (bin_y, bin_x) bag holds (s * 2) x (s * 2) corners
    ys_idx, ys_w = ys_idx.view(k, p, 1, s * 2, 1), ys_w.view(k, p, 1, s * 2, 1)
    xs_idx, xs_w = xs_idx.view(k, 1, p, 1, s * 2), xs_w.view(k, 1, p, 1, s * 2)
    width = hw[lvl, 1].view(k, 1, 1, 1, 1)
    base = (first_row[lvl] + rois[:, 0].long() * hw[lvl].prod(1)).view(k, 1, 1, 1, 1)
    index = (base + ys_idx * width + xs_idx).view(k * p * p, -1)
    weight = (ys_w * xs_w / (s * s)).view(k * p * p, -1).to(dtype)
    rows = torch.cat([m.permute(0, 2, 3, 1).reshape(-1, c) for m in maps])  # [sum B*H*W, C], channels contiguous
    out = F.embedding_bag(index, rows, mode="sum", per_sample_weights=weight)  # [K*p*p, C]
    return out.view(k, p, p, c).permute(0, 3, 1, 2).contiguous()
