"""The random steps of one augmentation pipeline draw independently of each other.

albumentations 2.0's ``Compose.set_random_seed(seed)`` gives every step its own generators seeded with the *same*
value, so the steps' draws coincide: each step's ``p`` test reads the same first number. A grayscale SimCLR view
(p=0.2) was then always a flipped one (p=0.5) and a colour-jittered one (p=0.8), and a detection image flipped
horizontally (p=0.5) was always flipped vertically too (p=0.5, BCCD's setting): two of the four orientations
never occurred. These tests look at joint rates, which the per-step rates (tests/data/test_simclr_views.py) cannot
see: every marginal rate was right under the bug.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detkit.data.transforms import DetectionTransform
from detkit.data.unlabeled import SimCLRViews, view_seeds
from detkit.data.weak_strong import WeakStrongViews

N = 600  # draws per check: the conditional rates below have >= ~100 samples each


def _assert_near(flags: np.ndarray, p: float, what: str) -> None:
    """The fraction of ``flags`` is within 4 binomial sigmas of ``p``."""
    rate, tol = float(np.mean(flags)), 4 * math.sqrt(p * (1 - p) / len(flags))
    assert abs(rate - p) <= tol, f"{what}: {rate:.3f} over {len(flags)} draws, expected {p} +- {tol:.3f}"


def _seeds(seeded: bool) -> list[int | None]:
    """Item seeds as loader workers pass them, or ``None`` (the main process: each pipeline then seeds itself
    from ``torch.initial_seed()``, fixed here so that the check is the same on every run)."""
    if not seeded:
        torch.manual_seed(20261201)
    return [view_seeds(1000 + i)[0] for i in range(N)] if seeded else [None] * N


def _picture(side: int = 32) -> np.ndarray:
    """Dark left half, bright coloured right half: a horizontal flip swaps them, grayscale removes the colour."""
    img = np.empty((side, side, 3), np.uint8)
    img[:, : side // 2] = (60, 20, 0)
    img[:, side // 2:] = (250, 200, 120)
    return img


@pytest.mark.parametrize("seeded", [True, False], ids=["item-seeded (loader workers)", "main process"])
def test_detection_flips_are_independent(seeded: bool):
    """hflip 0.5 and vflip 0.5 (BCCD's setting): each of the four orientations about a quarter of the time."""
    image = np.zeros((64, 64, 3), np.uint8)
    box = np.array([[4, 4, 20, 20]], np.float32)  # top-left corner: where it lands says which flips ran
    t = DetectionTransform(64, train=True, hflip=0.5, vflip=0.5, scale_range=(1.0, 1.0), color_jitter=0.0)
    h, v = [], []
    for s in _seeds(seeded):
        _, boxes, _, _ = t(image, box, np.array([1]), seed=s)
        h.append(boxes[0, 0] > 32)
        v.append(boxes[0, 1] > 32)
    h, v = np.array(h), np.array(v)
    for hv in ((False, False), (False, True), (True, False), (True, True)):
        _assert_near((h == hv[0]) & (v == hv[1]), 0.25, f"orientation (hflip, vflip) = {hv}")


def _flipped(v: torch.Tensor) -> bool:
    lum = v.float().mean(0)
    return bool(lum[:, : lum.shape[1] // 2].mean() > lum[:, lum.shape[1] // 2:].mean())


def _gray(v: torch.Tensor) -> bool:
    vf = v.float()
    return bool((vf - vf.mean(0, keepdim=True)).abs().amax() < 1.0)


def _changed(v: torch.Tensor) -> bool:
    pic = torch.from_numpy(_picture()).permute(2, 0, 1).float()
    vf = v.float()
    return bool(torch.minimum((vf - pic).abs().amax(), (vf - pic.flip(-1)).abs().amax()) > 2.0)


@pytest.mark.parametrize("seeded", [True, False], ids=["item-seeded (loader workers)", "main process"])
def test_simclr_flip_is_independent_of_grayscale_and_jitter(seeded: bool):
    """P(flip | grayscale) = P(flip | colour) = 0.5 and P(jitter | flip) = P(jitter | no flip) = 0.8."""
    img = _picture()
    gray_views = SimCLRViews(32, crop_scale=(1.0, 1.0), jitter_p=0.0, gray_p=0.2, blur_p=0.0)
    views = [gray_views.view(img, s) for s in _seeds(seeded)]
    flip, gray = np.array([_flipped(v) for v in views]), np.array([_gray(v) for v in views])
    _assert_near(gray, 0.2, "grayscale")
    _assert_near(flip[gray], 0.5, "flip among grayscale views")
    _assert_near(flip[~gray], 0.5, "flip among colour views")

    jitter_views = SimCLRViews(32, crop_scale=(1.0, 1.0), jitter_p=0.8, gray_p=0.0, blur_p=0.0)
    views = [jitter_views.view(img, s) for s in _seeds(seeded)]
    flip, changed = np.array([_flipped(v) for v in views]), np.array([_changed(v) for v in views])
    _assert_near(changed[flip], 0.8, "colour jitter among flipped views")
    _assert_near(changed[~flip], 0.8, "colour jitter among unflipped views")


def test_simclr_crop_scale_is_independent_of_brightness():
    """The crop's area and the jitter's brightness factor are two draws, not one: their correlation is ~0.

    The picture is a horizontal ramp, so a crop's width shows as the ramp's slope in the view; brightness alone
    (contrast, saturation and hue off) multiplies every pixel, so the mean over a flat grey picture shows it.
    """
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.float32)[None, :, None], (64, 1, 3)).astype(np.uint8)
    crop = SimCLRViews(64, crop_scale=(0.08, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    bright = SimCLRViews(64, crop_scale=(1.0, 1.0), jitter=0.4, jitter_p=1.0, gray_p=0.0, blur_p=0.0)
    bright.pipeline.pipeline.transforms[2].contrast = (1.0, 1.0)
    bright.pipeline.pipeline.transforms[2].saturation = (1.0, 1.0)
    bright.pipeline.pipeline.transforms[2].hue = (0.0, 0.0)
    flat = np.full((64, 64, 3), 100, np.uint8)
    seeds = _seeds(True)
    span = []
    for s in seeds:
        row = crop.view(ramp, s)[0, 32].float()
        span.append(float((row.max() - row.min())))  # a narrow crop spans a short piece of the ramp
    level = [float(bright.view(flat, s).float().mean()) for s in seeds]
    r = float(np.corrcoef(span, level)[0, 1])
    assert abs(r) < 4 / math.sqrt(N), f"crop width and brightness correlate: r = {r:.3f}"


@pytest.mark.parametrize("seeded", [True, False], ids=["item-seeded (loader workers)", "main process"])
def test_weak_strong_photometric_draws_are_independent(seeded: bool):
    """The strong view's jitter (p=0.8) and grayscale (p=0.2): P(gray | jitter) = P(gray | no jitter) = 0.2."""
    img = np.empty((32, 32, 3), np.uint8)
    img[:] = (250, 200, 120)
    img[:, :16] = (60, 20, 0)
    views = WeakStrongViews(32, hflip=0.0, jitter=0.4, jitter_p=0.8, gray_p=0.2, blur_p=0.0, erasing=False)
    gray, jitter = [], []
    seeds = _seeds(seeded)
    for i in range(N):
        seed = 5000 + i if seeded else seeds[i]
        weak, strong, _, _, _ = views(img, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), seed=seed)
        g = _gray(strong)
        gray.append(g)
        # a jittered colour view differs from the weak one; a grayscale view is checked against the weak one's gray
        weak_gray = weak.float().mul(torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
        ref = weak_gray if g else weak.float()
        jitter.append(bool((strong.float() - ref).abs().amax() > 2.0))
    gray, jitter = np.array(gray), np.array(jitter)
    _assert_near(gray[~jitter], 0.2, "grayscale among unjittered strong views")  # 0 when the draws coincide
    _assert_near(gray[jitter], 0.2, "grayscale among jittered strong views")


def test_weak_strong_geometry_and_photometry_read_different_streams_in_the_main_process():
    """Without item seeds both pipelines seed themselves from ``torch.initial_seed()``: with one stream the first
    call's hflip test (p=0.5) and jitter test (p=0.5) would read the same number and always agree."""
    img = np.empty((32, 32, 3), np.uint8)
    img[:] = (250, 200, 120)
    img[:, :16] = (60, 20, 0)
    agree = []
    for s in range(200):
        torch.manual_seed(s)
        views = WeakStrongViews(32, hflip=0.5, jitter=0.4, jitter_p=0.5, gray_p=0.0, blur_p=0.0, erasing=False)
        weak, strong, _, _, _ = views(img, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
        flipped = _flipped(weak[:, :, :32])
        jittered = bool((strong.float() - weak.float()).abs().amax() > 2.0)
        agree.append(flipped == jittered)
    _assert_near(np.array(agree), 0.5, "first call: hflip and jitter agree")
