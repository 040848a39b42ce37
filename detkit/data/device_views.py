"""SimCLR views made on the device, a whole batch at once (``data.augment_on=device``).

The CPU path (:class:`detkit.data.unlabeled.SimCLRViews`, albumentations in the loader workers) augments one image
at a time; at GPU speeds the workers cannot keep up. Here the loader only decodes each image and places it in a
fixed-size *source* canvas (:class:`SourceImage`: shrunk to fit, never enlarged, edges repeated), and :class:`DeviceSimCLRViews` draws every view's parameters
independently per image and per view on the device and applies them as batched tensor ops:

* random resized crop: area fraction ``U(scale)`` of the image (its valid, unpadded part) and ``log(w/h)``
  ``U(log 3/4, log 4/3)``, ten tries per view and the first that fits, else the whole image clamped to the ratio
  range (torchvision's and albumentations' algorithm); the crops are cut and resized in one ``roi_align`` call
  (bilinear, aligned, adaptive sampling);
* horizontal flip (p 0.5);
* colour jitter with probability ``jitter_p``: brightness, contrast, saturation (factors ``U(1 - s, 1 + s)``) and
  hue (shift ``U(-s/4, s/4)`` of a turn), in a random order per view, as in the paper's torchvision recipe;
* grayscale (``gray_p``), Gaussian blur (``blur_p``; sigma ``U(0.1, 2.0)``, kernel ~10% of the side, one grouped
  convolution for the whole batch), solarize (``solarize_p``, off by default).

Every draw comes from one ``torch.Generator`` on the device, so a seeded run is reproducible; nothing is read back
to the host. Output: ``float32 [2B, 3, size, size]`` pixels in 0..255 (the encoder normalises), the first ``B``
rows view 1 and the last ``B`` view 2.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from detkit.data.unlabeled import default_blur_p

GRAY = torch.tensor([0.299, 0.587, 0.114])


class SourceImage:
    """Loader-side transform for device views: RGB ``uint8 [H, W, 3]`` -> (``uint8 [3, S, S]``, ``float32 [2]`` the
    valid width and height in ``S`` pixels).

    The image sits at the top-left of the ``S x S`` canvas. An image larger than ``S`` is shrunk (area
    interpolation) so that its longer side is ``S``; a smaller one keeps its own pixels: enlarging it would only
    blur what the crops sample (a 32 px image upsampled to 64 and sampled back loses a third of its sharpness). The
    canvas beyond the image repeats its last row and column, so that bilinear samples at the image's edge read the
    edge pixel, as cropping then resizing the image itself does, and never the padding.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        import cv2

        h, w = image.shape[:2]
        scale = min(1.0, self.size / max(h, w))
        nw, nh = min(self.size, max(1, round(w * scale))), min(self.size, max(1, round(h * scale)))
        resized = image if (nw, nh) == (w, h) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        out = cv2.copyMakeBorder(np.ascontiguousarray(resized), 0, self.size - nh, 0, self.size - nw,
                                 cv2.BORDER_REPLICATE)
        return torch.from_numpy(out.transpose(2, 0, 1).copy()), torch.tensor([nw, nh], dtype=torch.float32)


def device_view_seed(seed: int, batch_number: int, rank: int) -> int:
    """The generator seed of one training batch's device views: a function of the run's data ``seed``, the batch's
    number in the run (every micro-batch of a gradient-accumulation group has its own) and the process ``rank``
    (every DDP process draws its own views), so no two batches of a run share their draws."""
    return hash((int(seed), int(batch_number), int(rank))) % 2**63


def sample_crops(sizes: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                 generator: torch.Generator, tries: int = 10) -> torch.Tensor:
    """Random-resized-crop boxes ``[N, 4]`` (xyxy) inside images of valid ``sizes [N, 2]`` (w, h)."""
    n, dev = len(sizes), sizes.device
    w_img, h_img = sizes[:, 0:1], sizes[:, 1:2]
    area = w_img * h_img * torch.empty(n, tries, device=dev).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, tries, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = log_r.exp()
    w, h = (area * r).sqrt(), (area / r).sqrt()
    fits = (w <= w_img) & (h <= h_img)
    first = (fits.float() * torch.arange(tries, 0, -1, device=dev)).argmax(1, keepdim=True)  # first try that fits
    w, h, ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    # fallback (no try fits): the whole image, clamped to the ratio range, centred
    in_ratio = w_img[:, 0] / h_img[:, 0]
    fw = torch.where(in_ratio < ratio[0], w_img[:, 0], torch.where(in_ratio > ratio[1], h_img[:, 0] * ratio[1],
                                                                   w_img[:, 0]))
    fh = torch.where(in_ratio < ratio[0], w_img[:, 0] / ratio[0], torch.where(in_ratio > ratio[1], h_img[:, 0],
                                                                              h_img[:, 0]))
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    u = torch.rand(n, 2, device=dev, generator=generator)
    x0 = torch.where(ok, u[:, 0] * (w_img[:, 0] - w), (w_img[:, 0] - w) / 2)
    y0 = torch.where(ok, u[:, 1] * (h_img[:, 0] - h), (h_img[:, 0] - h) / 2)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * GRAY.to(x.device, x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` RGB in 0..1 -> HSV with hue in 0..1."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)  # n = 5, 3, 1
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


class DeviceSimCLRViews(nn.Module):
    """Two SimCLR views per image of a batch, made on the batch's device (see the module docstring).

    Args mirror :class:`detkit.data.unlabeled.SimCLRViews`: ``size`` (view side), ``crop_scale``, ``jitter``
    (strength ``s``: brightness/contrast/saturation ``s``, hue ``s / 4``), ``jitter_p``, ``gray_p``, ``blur_p``,
    plus ``solarize_p``; ``blur_p=None`` follows :func:`detkit.data.unlabeled.default_blur_p`.
    """

    def __init__(self, size: int = 64, crop_scale: tuple[float, float] = (0.08, 1.0), jitter: float = 0.4,
                 jitter_p: float = 0.8, gray_p: float = 0.2, blur_p: float | None = None, solarize_p: float = 0.0,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        super().__init__()
        self.size, self.crop_scale, self.ratio = int(size), tuple(crop_scale), tuple(ratio)
        self.jitter, self.jitter_p, self.gray_p, self.solarize_p = jitter, jitter_p, gray_p, solarize_p
        self.blur_p = default_blur_p(self.size, blur_p)
        self.kernel = max(3, int(0.1 * self.size) // 2 * 2 + 1)  # ~10% of the side, odd (as the CPU path)

    def _u(self, n: int, lo: float, hi: float, g: torch.Generator, dev) -> torch.Tensor:
        return torch.empty(n, device=dev).uniform_(lo, hi, generator=g).view(n, 1, 1, 1)

    def _bern(self, n: int, p: float, g: torch.Generator, dev) -> torch.Tensor:
        return (torch.rand(n, device=dev, generator=g) < p).view(n, 1, 1, 1)

    def color_jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``x`` in 0..1; each view gets its own factors and its own order of the four operations."""
        n, dev, s = len(x), x.device, self.jitter
        bright, contrast, sat = (self._u(n, max(0.0, 1 - s), 1 + s, g, dev) for _ in range(3))
        hue = self._u(n, -s / 4, s / 4, g, dev)
        order = torch.rand(n, 4, device=dev, generator=g).argsort(1)  # a random permutation per view
        out = x
        for pos in range(4):
            op = order[:, pos].view(n, 1, 1, 1)
            mean = _gray(out).mean((2, 3), keepdim=True)
            cand_b = (out * bright).clamp(0, 1)
            cand_c = ((out - mean) * contrast + mean).clamp(0, 1)
            gray = _gray(out)
            cand_s = ((out - gray) * sat + gray).clamp(0, 1)
            hsv = _rgb_to_hsv(out)
            cand_h = _hsv_to_rgb(torch.cat([(hsv[:, :1] + hue) % 1.0, hsv[:, 1:]], 1))
            out = torch.where(op == 0, cand_b, torch.where(op == 1, cand_c, torch.where(op == 2, cand_s, cand_h)))
        return out

    def blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Gaussian blur with one ``sigma [N]`` per view: a separable grouped convolution over the whole batch."""
        n, c, h, w = x.shape
        k = self.kernel
        t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
        kern = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*C, k]
        y = F.pad(x.reshape(1, n * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
        y = F.conv2d(y, kern.view(n * c, 1, 1, k), groups=n * c)
        y = F.conv2d(y, kern.view(n * c, 1, k, 1), groups=n * c)
        return y.view(n, c, h, w)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``images uint8 [B, 3, S, S]`` (letterboxed at the top-left), ``sizes [B, 2]`` their valid (w, h) ->
        ``float32 [2B, 3, size, size]`` in 0..255 (view 1 of every image, then view 2)."""
        b, dev, g = len(images), images.device, generator
        x = images.float()
        sizes = sizes.to(dev, torch.float32)
        boxes = sample_crops(sizes.repeat(2, 1), self.crop_scale, self.ratio, g)  # [2B, 4]: two views per image
        index = torch.arange(b, device=dev, dtype=torch.float32).repeat(2)[:, None]
        # adaptive sampling: ceil(crop side / view side) bilinear samples per output pixel and axis, averaged (an
        # area-style antialias when the crop is larger than the view; one sample at the centre when it is not)
        v = roi_align(x, torch.cat([index, boxes], 1), (self.size, self.size), 1.0, sampling_ratio=0,
                      aligned=True) / 255.0
        n = len(v)
        v = torch.where(self._bern(n, 0.5, g, dev), v.flip(-1), v)
        v = torch.where(self._bern(n, self.jitter_p, g, dev), self.color_jitter(v, g), v)
        v = torch.where(self._bern(n, self.gray_p, g, dev), _gray(v).expand_as(v), v)
        sigma = torch.empty(n, device=dev).uniform_(0.1, 2.0, generator=g)
        v = torch.where(self._bern(n, self.blur_p, g, dev), self.blur(v, sigma), v)
        if self.solarize_p > 0:
            v = torch.where(self._bern(n, self.solarize_p, g, dev) & (v >= 0.5), 1.0 - v, v)
        return v.clamp(0, 1) * 255.0
