"""SimCLR views made on the CPU (albumentations in the loader workers): every view of every item is its own draw.

The checks go through a real ``DataLoader`` with two workers, as training does: a bug that reuses one random draw
for a whole worker (view 2 reseeded from the worker's constant ``torch.initial_seed()``) only shows there.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detkit.data.shuffle import epoch_shuffled_loader
from detkit.data.unlabeled import SimCLRViews, UnlabeledImages

SIDE, BATCH, BATCHES = 32, 64, 4


def _picture() -> np.ndarray:
    """A coloured ``SIDE x SIDE`` RGB picture: dark left half, bright right half (a flip swaps them)."""
    img = np.empty((SIDE, SIDE, 3), dtype=np.uint8)
    img[:, : SIDE // 2] = (60, 20, 0)
    img[:, SIDE // 2:] = (250, 200, 120)
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """``BATCH * BATCHES`` copies of one picture, so any difference between views is the augmentation's."""
    root = tmp_path_factory.mktemp("copies")
    bgr = cv2.cvtColor(_picture(), cv2.COLOR_RGB2BGR)
    for i in range(BATCH * BATCHES):
        cv2.imwrite(str(root / f"{i:04d}.png"), bgr)
    return root


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory) -> Path:
    """``BATCH * BATCHES`` copies of one random-noise picture, large enough that two random crops of it almost never coincide (at 64 x 48 px, 21 of 3,000 views from distinct seeds do)."""
    root = tmp_path_factory.mktemp("noise")
    img = np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8)
    for i in range(BATCH * BATCHES):
        cv2.imwrite(str(root / f"{i:04d}.png"), img)
    return root


def _epoch(folder: Path, views: SimCLRViews, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dataset = UnlabeledImages(folder, views)
    loader = epoch_shuffled_loader(dataset, seed, None, BATCH, num_workers=2)
    return list(loader)


def _flipped(v: torch.Tensor) -> torch.Tensor:
    """``[N, 3, S, S]`` -> bool ``[N]``: the dark half is on the right."""
    lum = v.float().mean(1)
    return lum[:, :, : SIDE // 2].mean((1, 2)) > lum[:, :, SIDE // 2:].mean((1, 2))


def _gray(v: torch.Tensor) -> torch.Tensor:
    vf = v.float()
    return ((vf - vf.mean(1, keepdim=True)).abs().amax((1, 2, 3))) < 1.0


def _changed(v: torch.Tensor) -> torch.Tensor:
    """Pixels differ from the picture and from its mirror image (colour jitter or blur was applied)."""
    pic = torch.from_numpy(_picture()).permute(2, 0, 1).float()
    vf = v.float()
    plain = (vf - pic).abs().amax((1, 2, 3))
    mirror = (vf - pic.flip(-1)).abs().amax((1, 2, 3))
    return torch.minimum(plain, mirror) > 2.0


def _assert_rate(flags: torch.Tensor, p: float, what: str) -> None:
    """Per batch, and over the epoch, the fraction of views with ``flags`` is within 3.5 binomial sigmas of p."""
    tol = 3.5 * math.sqrt(p * (1 - p) / BATCH)
    rates = flags.view(BATCHES, BATCH).float().mean(1)
    assert ((rates - p).abs() <= tol).all(), f"{what}: per-batch rates {rates.tolist()} vs p={p}"
    overall = float(flags.float().mean())
    assert abs(overall - p) <= 3.5 * math.sqrt(p * (1 - p) / flags.numel()), f"{what}: {overall} vs p={p}"


@pytest.mark.parametrize("view", [0, 1])
def test_flip_and_grayscale_rates_follow_their_probabilities_in_both_views(folder: Path, view: int):
    batches = _epoch(folder, SimCLRViews(SIDE, crop_scale=(1.0, 1.0), jitter_p=0.0, gray_p=0.2, blur_p=0.0))
    v = torch.cat([b[view] for b in batches])
    assert not _changed(v[~_gray(v)]).any()  # whole-image crops: only flips and grayscale in this setting
    _assert_rate(_flipped(v), 0.5, f"flip, view {view + 1}")
    _assert_rate(_gray(v), 0.2, f"grayscale, view {view + 1}")


@pytest.mark.parametrize("view", [0, 1])
def test_jitter_and_blur_rates_follow_their_probabilities_in_both_views(folder: Path, view: int):
    jitter = _epoch(folder, SimCLRViews(SIDE, crop_scale=(1.0, 1.0), jitter_p=0.8, gray_p=0.0, blur_p=0.0))
    _assert_rate(_changed(torch.cat([b[view] for b in jitter])), 0.8, f"colour jitter, view {view + 1}")
    blur = _epoch(folder, SimCLRViews(SIDE, crop_scale=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.5,
                                      blur_sigma=(1.0, 2.0)))
    _assert_rate(_changed(torch.cat([b[view] for b in blur])), 0.5, f"blur, view {view + 1}")


def _distinct(views: torch.Tensor) -> int:
    return len(torch.unique(views.flatten(1), dim=0))


def test_every_view_of_every_item_is_distinct_and_the_epoch_is_reproducible(noise_folder: Path):
    views = SimCLRViews(SIDE)  # the default recipe: random resized crops of copies of one picture
    batches = _epoch(noise_folder, views, seed=0)
    v1, v2 = (torch.cat([b[k] for b in batches]) for k in (0, 1))
    assert _distinct(v1) == len(v1) and _distinct(v2) == len(v2), "items share a view"
    assert _distinct(torch.cat([v1, v2])) == 2 * len(v1), "a view 1 equals a view 2"
    again = _epoch(noise_folder, views, seed=0)
    for (a1, a2), (b1, b2) in zip(batches, again):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    other = _epoch(noise_folder, views, seed=1)
    assert not torch.equal(batches[0][1], other[0][1])


def test_views_made_in_the_main_process_are_independent_too(noise_folder: Path):
    dataset = UnlabeledImages(noise_folder, SimCLRViews(SIDE))
    items = [dataset[i] for i in range(16)]
    assert _distinct(torch.stack([v for pair in items for v in pair])) == 32
