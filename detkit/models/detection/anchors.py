"""Anchor generation: sizes x aspect ratios per feature level, on a regular grid, cached per size and device."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from detkit.models.detection.shape_cache import cached


class AnchorGenerator(nn.Module):
    """Anchors for a list of feature maps, one (sizes, aspect_ratios) pair per level.

    The classic single-level Faster R-CNN setting of 3 scales x 3 ratios is
    ``AnchorGenerator(sizes=[[128, 256, 512]], aspect_ratios=[[0.5, 1.0, 2.0]])``. Anchors follow torchvision's
    convention (``w = size / sqrt(ratio)``, ``h = size * sqrt(ratio)``, ratio = h/w; base anchors rounded to
    integers; centred on the top-left corner of each cell, ratio-major order), so they equal
    ``torchvision.models.detection.anchor_utils.AnchorGenerator`` box for box.

    Args:
        sizes: per level, the anchor sizes (sqrt of area, in input pixels).
        aspect_ratios: per level, the height/width ratios.
        fit: the fit policy :func:`detkit.models.detection.anchor_fit.decide_anchors` applies to these before
            training (``detkit-train`` calls it and records the anchors trained with in the run's config; the
            generator itself never looks at data): ``"auto"`` replaces them by anchors fitted to the training
            boxes when the configured ones miss most boxes and the fitted ones cover clearly more, ``"always"``
            replaces them, ``"never"`` keeps them (the coverage is reported either way).
    """

    FIT_MODES = ("auto", "always", "never")

    def __init__(self, sizes: Sequence[Sequence[float]] = ((16, 24), (32, 48), (64, 96), (128, 192)),
                 aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 4, fit: str = "auto") -> None:
        super().__init__()
        if fit not in self.FIT_MODES:
            raise ValueError(f"anchor fit must be one of {self.FIT_MODES}, got {fit!r}")
        self.fit = fit
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"anchor sizes give {len(sizes)} levels but aspect_ratios give {len(aspect_ratios)}: "
                             "give one list of each per feature level")
        self.sizes = [list(map(float, s)) for s in sizes]
        self.aspect_ratios = [list(map(float, r)) for r in aspect_ratios]
        self._cache: dict = {}

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    @staticmethod
    def base_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> torch.Tensor:
        """``[len(ratios) * len(sizes), 4]`` zero-centred anchors (ratio-major)."""
        scales = torch.as_tensor(sizes, dtype=torch.float32)
        h_ratios = torch.sqrt(torch.as_tensor(ratios, dtype=torch.float32))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def check_levels(self, num_levels: int) -> None:
        if num_levels != self.num_levels:
            raise ValueError(
                f"the anchor generator has {self.num_levels} level(s) of sizes/aspect_ratios but the backbone gives "
                f"{num_levels} feature map(s): give one sizes list and one aspect_ratios list per feature level")

    def grid_anchors(self, level: int, grid: tuple[int, int], stride: tuple[int, int],
                     device: torch.device) -> torch.Tensor:
        def build() -> torch.Tensor:
            base = self.base_anchors(self.sizes[level], self.aspect_ratios[level]).to(device)
            sy = torch.arange(grid[0], dtype=torch.float32, device=device) * stride[0]
            sx = torch.arange(grid[1], dtype=torch.float32, device=device) * stride[1]
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            return (shifts + base[None]).reshape(-1, 4)

        return cached(self._cache, (level, grid, stride, str(device)), build)

    def forward(self, features: Sequence[torch.Tensor], image_size: tuple[int, int]) -> list[torch.Tensor]:
        """Anchors per level, ``[H_l * W_l * A_l, 4]`` xyxy, shared by every image of the (padded) batch; cached
        per feature shape and device, so a training step builds no anchors after the first.

        Order within a level: location-major (row, then column), anchor-minor, matching a head output of shape
        ``[B, A, H, W]`` permuted to ``[B, H, W, A]``.
        """
        self.check_levels(len(features))
        out = []
        for level, f in enumerate(features):
            grid = (int(f.shape[-2]), int(f.shape[-1]))
            stride = (image_size[0] // grid[0], image_size[1] // grid[1])
            out.append(self.grid_anchors(level, grid, stride, f.device))
        return out

    def concatenated(self, features: Sequence[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """``torch.cat(self(features, image_size))``: all levels' anchors ``[sum_l H_l * W_l * A_l, 4]`` xyxy,
        cached per feature shapes and device like the per-level ones."""
        key = ("all", tuple((int(f.shape[-2]), int(f.shape[-1])) for f in features), tuple(image_size),
               str(features[0].device))
        return cached(self._cache, key, lambda: torch.cat(self(features, image_size)))


def anchors_per_location(sizes: Sequence[Sequence[float]], ratios: Sequence[Sequence[float]]) -> int:
    """The single number of anchors per location a shared head needs; errors if levels disagree."""
    counts = {len(s) * len(r) for s, r in zip(sizes, ratios)}
    if len(counts) != 1:
        raise ValueError(f"every level needs the same number of anchors per location for a shared head, got "
                         f"{sorted(counts)} (sizes={sizes}, aspect_ratios={ratios})")
    return counts.pop()


