"""RoIAlign forward + backward: detkit's gather kernel vs torchvision's roi_align, at Faster R-CNN FPN sizes.

    python scripts/bench_roi_align.py [--threads 2] [--image-size 320] [--batch 4] [--rois 512]

Both pool the same RoIs from three FPN levels (strides 8/16/32, 128 channels) to 7x7 with sampling ratio 2, in one
process: torchvision with one roi_align call per level (as RoIPooler(impl="torchvision") and torchvision's
MultiScaleRoIAlign do), detkit with one embedding_bag gather for all levels (RoIPooler(impl="gather"), the CPU
default). Values are checked equal before timing. Prints median ms over the repeats and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from detkit.models.detection.roi_heads import RoIPooler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rois", type=int, default=512, help="RoIs per image")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(args.batch, 128, args.image_size // s, args.image_size // s, generator=g, requires_grad=True)
             for s in (8, 16, 32)]
    n = args.batch * args.rois
    xy = torch.rand(n, 2, generator=g) * args.image_size * 0.9
    wh = (torch.rand(n, 2, generator=g) ** 2) * args.image_size * 0.5 + 4
    rois = torch.cat([torch.arange(args.batch).repeat_interleave(args.rois)[:, None].float(), xy,
                      (xy + wh).clamp(max=args.image_size)], 1)
    poolers = {impl: RoIPooler([8, 16, 32], 7, 2, aligned=False, impl=impl) for impl in ("torchvision", "gather")}
    ref, out = poolers["torchvision"](feats, rois), poolers["gather"](feats, rois)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    times = {}
    for impl, pooler in poolers.items():
        fwd, bwd = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            y = pooler(feats, rois)
            t1 = time.perf_counter()
            y.backward(torch.ones_like(y))
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
        times[impl] = (statistics.median(fwd) * 1e3, statistics.median(bwd) * 1e3)
    print(f"RoIAlign, {n} RoIs ({args.batch} images x {args.rois}), FPN levels at {args.image_size}px, 128 channels, "
          f"7x7, sampling ratio 2, {args.threads} threads, torch {torch.__version__}")
    print("| kernel | forward ms | backward ms | total ms |")
    print("| --- | --- | --- | --- |")
    for impl, (f, b) in times.items():
        print(f"| {impl} | {f:.1f} | {b:.1f} | {f + b:.1f} |")
    (tf, tb), (gf, gb) = times["torchvision"], times["gather"]
    print(f"| speed-up gather vs torchvision | {tf / gf:.2f}x | {tb / gb:.2f}x | {(tf + tb) / (gf + gb):.2f}x |")


if __name__ == "__main__":
    main()
